"""The three real datasets in ../shared/datasets go through convert/verify/plan with default commands and no
dataset-specific code; a CHASE_DB1 model predicts a 2D label PNG. Skipped when ../shared is absent."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.cli import main
from autoseg.contracts.plans import load_plans

DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def _need(name: str) -> Path:
    path = DATASETS / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


def _link_raw(root: Path, source: Path, cases: list[str] | None = None) -> Path:
    """A raw dataset under ``root`` made of symlinks to ``source`` (optionally a subset of cases):
    the real data is read in place, never copied into the repository."""
    target = root / "raw" / source.name
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True)
        for file in sorted((source / sub).iterdir()):
            case = file.name.split(".")[0].rsplit("_", 1)[0] if sub == "imagesTr" else file.name.split(".")[0]
            if cases is None or case in cases:
                (target / sub / file.name).symlink_to(file)
    spec = (source / "dataset.json").read_text()
    if cases is not None:
        import json

        data = json.loads(spec)
        data["numTraining"] = len(cases)
        spec = json.dumps(data)
    (target / "dataset.json").write_text(spec)
    return target


def test_hippocampus_converts_verifies_and_plans_3d_fullres_and_2d_at_1mm(tmp_path):
    task = _need("Task04_Hippocampus")
    assert main(["convert-msd", str(task), "--root", str(tmp_path)]) == 0
    assert main(["verify", "4", "--root", str(tmp_path)]) == 0
    assert main(["plan", "Hippocampus", "--root", str(tmp_path), "--no-preprocess", "--arch", "unet"]) == 0
    plans = load_plans(tmp_path / "preprocessed" / "Dataset004_Hippocampus" / "plans.json")
    assert set(plans.default_configurations) == {"2d", "3d_fullres"}
    assert plans.configurations["3d_fullres"].target_spacing == pytest.approx([1.0, 1.0, 1.0])
    assert plans.configurations["2d"].target_spacing == pytest.approx([1.0, 1.0])
    assert plans.num_channels == 1
    assert plans.labels == {"background": 0, "Anterior": 1, "Posterior": 2}
    # uint8 and float32 cases with wildly different ranges: per-image z-score, not a global CT rule
    assert plans.configurations["3d_fullres"].normalization == ["zscore"]


@pytest.mark.parametrize("name, channels", [("Dataset201_ISBIEM", 1), ("Dataset202_CHASEDB1", 3)])
def test_2d_png_datasets_verify_and_plan_only_2d(tmp_path, name, channels):
    source = _need(name)
    _link_raw(tmp_path, source)
    assert main(["verify", name, "--root", str(tmp_path)]) == 0
    assert main(["plan", name, "--root", str(tmp_path), "--no-preprocess", "--arch", "unet"]) == 0
    plans = load_plans(tmp_path / "preprocessed" / name / "plans.json")
    assert list(plans.configurations) == ["2d"]
    config = plans.configurations["2d"]
    assert plans.num_channels == channels and len(config.normalization) == channels
    assert config.target_spacing == pytest.approx([1.0, 1.0])
    assert sorted(plans.labels.values()) == [0, 1]


def test_chasedb1_model_predicts_a_2d_label_png_of_the_input_size(tmp_path):
    source = _need("Dataset202_CHASEDB1")
    cases = sorted(p.name[: -len("_0000.png")] for p in (source / "imagesTr").glob("*_0000.png"))[:3]
    _link_raw(tmp_path, source, cases)
    root = str(tmp_path)
    # a small patch keeps the CPU cost of this plumbing test low; the planner itself is tested above
    assert main(["plan", "Dataset202_CHASEDB1", "--root", root, "--arch", "unet", "--patch-size", "128", "128"]) == 0
    assert main(["train", "202", "2d", "all", "--root", root, "--epochs", "1", "--iters-per-epoch", "2",
                 "--no-validation", "--device", "cpu", "-np", "0"]) == 0
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = source / "imagesTr" / f"{cases[0]}_0000.png"
    shutil.copy(image, inputs / image.name)
    out = tmp_path / "out"
    assert main(["predict", "-i", str(inputs), "-o", str(out), "-d", "202", "-c", "2d", "-f", "all",
                 "--root", root, "--no-mirror", "--device", "cpu"]) == 0
    written = sitk.ReadImage(str(out / f"{cases[0]}.png"))
    original = sitk.ReadImage(str(image))
    assert written.GetDimension() == 2 and written.GetNumberOfComponentsPerPixel() == 1
    assert written.GetSize() == original.GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1}
