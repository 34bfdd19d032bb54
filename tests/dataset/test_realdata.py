"""Real and reference datasets from ../shared (beside the repository) verify clean; skipped when absent."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from autoseg.cli import main
from autoseg.dataset import load_dataset_spec
from autoseg.dataset.msd import convert_msd

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
DATASETS = SHARED / "datasets"
ORACLE = SHARED / "reference" / "oracle"
MAKE_SYNTHETIC = SHARED / "bench" / "make_synthetic.py"

pytestmark = pytest.mark.realdata


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not available on this machine")


@pytest.mark.parametrize("name, channels", [("Dataset201_ISBIEM", 1), ("Dataset202_CHASEDB1", 3)])
def test_real_2d_datasets_verify_clean(name: str, channels: int, capsys: pytest.CaptureFixture[str]) -> None:
    _need(DATASETS / name)
    code = main(["verify", str(DATASETS / name), "-np", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith(f"{name}: OK")
    assert load_dataset_spec(DATASETS / name).num_channels == channels


@pytest.mark.slow
def test_hippocampus_converts_and_verifies_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = DATASETS / "Task04_Hippocampus"
    _need(task)
    out = convert_msd(task, root=tmp_path, num_workers=2)
    assert out.name == "Dataset004_Hippocampus"
    spec = load_dataset_spec(out)
    assert spec.labels == {"background": 0, "Anterior": 1, "Posterior": 2} and spec.channel_names == {0: "MRI"}
    assert spec.num_training == len(list((task / "labelsTr").glob("[!.]*.nii.gz")))
    code = main(["verify", "4", "--root", str(tmp_path), "-np", "2"])
    report = capsys.readouterr().out
    assert code == 0, report
    assert f"Dataset004_Hippocampus: OK ({spec.num_training} training cases" in report


def _recipes() -> list[Path]:
    return sorted(ORACLE.glob("*/recipe.txt")) if ORACLE.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("recipe", _recipes() or [ORACLE / "absent"], ids=lambda p: p.parent.name)
def test_oracle_datasets_regenerated_verify_clean(recipe: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _need(recipe)
    _need(MAKE_SYNTHETIC)
    words = shlex.split(recipe.read_text().strip())
    args = words[words.index(next(w for w in words if w.endswith("make_synthetic.py"))) + 1:]
    out = tmp_path / Path(args[0]).name
    args[0] = str(out)
    args[args.index("-n") + 1] = "4" if "970" in out.name else "2"  # few cases keep the test quick
    subprocess.run([sys.executable, str(MAKE_SYNTHETIC), *args], check=True, capture_output=True, timeout=120)
    code = main(["verify", str(out), "-np", "2"])
    report = capsys.readouterr().out
    assert code == 0, report
    assert report.strip().splitlines()[-1].startswith(f"{out.name}: OK")
