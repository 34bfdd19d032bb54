"""Converting a synthetic Decathlon task: 4D images become one 3D file per channel with their geometry."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.cli import main
from autoseg.dataset import load_dataset_spec
from autoseg.dataset.msd import convert_msd, msd_to_dataset_json, task_number_and_name
from autoseg.dataset.verify import verify_dataset
from autoseg.errors import DatasetError
from autoseg.io import read_image, read_segmentation

SPACING_XYZ = (0.8, 0.9, 2.5)
ORIGIN_XYZ = (-40.5, 12.25, 3.0)
_c, _s = np.cos(0.3), np.sin(0.3)
DIRECTION_3D = (_c, -_s, 0.0, _s, _c, 0.0, 0.0, 0.0, 1.0)


def _volume(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN_XYZ)
    image.SetDirection(DIRECTION_3D)
    return image


def make_task(parent: Path, name: str = "Task07_Fake", cases: int = 2, modalities: int = 2) -> tuple[Path, dict]:
    """An MSD task: 4D images (x, y, z, modality), 3D labels, one test image, a macOS ._ file."""
    task = parent / name
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (task / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    originals = {}
    for index in range(cases + 1):
        case = f"fake_{index:03d}"
        channels = [rng.integers(0, 1000, (5, 6, 7)).astype(np.int16) for _ in range(modalities)]
        image = _volume(channels[0]) if modalities == 1 else sitk.JoinSeries([_volume(c) for c in channels])
        folder = "imagesTr" if index < cases else "imagesTs"
        sitk.WriteImage(image, str(task / folder / f"{case}.nii.gz"))
        originals[case] = channels
        if index < cases:
            label = (channels[0] > 500).astype(np.uint8) + (channels[-1] > 900).astype(np.uint8)
            sitk.WriteImage(_volume(label), str(task / "labelsTr" / f"{case}.nii.gz"))
    (task / "imagesTr" / "._fake_000.nii.gz").write_bytes(b"macOS resource fork, not an image")
    modality = {str(m): name for m, name in zip(range(modalities), ["T1", "T2", "FLAIR"])}
    msd = {"name": "Fake", "description": "synthetic", "licence": "CC0", "tensorImageSize": "4D",
           "modality": modality, "labels": {"0": "background", "1": "edema", "2": "core"},
           "numTraining": cases, "numTest": 1,
           "training": [{"image": f"./imagesTr/fake_{i:03d}.nii.gz", "label": f"./labelsTr/fake_{i:03d}.nii.gz"}
                        for i in range(cases)],
           "test": [f"./imagesTs/fake_{cases:03d}.nii.gz"]}
    (task / "dataset.json").write_text(json.dumps(msd))
    return task, originals


def test_4d_task_converts_to_one_file_per_channel_with_geometry(tmp_path: Path) -> None:
    task, originals = make_task(tmp_path)
    out = convert_msd(task, root=tmp_path / "root", num_workers=1)
    assert out == tmp_path / "root" / "raw" / "Dataset007_Fake"

    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "fake_000_0000.nii.gz", "fake_000_0001.nii.gz", "fake_001_0000.nii.gz", "fake_001_0001.nii.gz"]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["fake_002_0000.nii.gz", "fake_002_0001.nii.gz"]
    for case, channels in originals.items():
        folder = "imagesTr" if case != "fake_002" else "imagesTs"
        for channel, expected in enumerate(channels):
            array, geometry = read_image(out / folder / f"{case}_{channel:04d}.nii.gz")
            np.testing.assert_array_equal(array[0], expected)  # channel order kept, data exact
            assert geometry.shape == (5, 6, 7)
            np.testing.assert_allclose(geometry.spacing, SPACING_XYZ[::-1], atol=1e-6)  # array order z, y, x
            np.testing.assert_allclose(geometry.origin, ORIGIN_XYZ, atol=1e-5)
            np.testing.assert_allclose(geometry.direction, DIRECTION_3D, atol=1e-6)
    assert (out / "labelsTr" / "fake_000.nii.gz").read_bytes() == (task / "labelsTr" / "fake_000.nii.gz").read_bytes()

    spec = load_dataset_spec(out)
    assert spec.channel_names == {0: "T1", 1: "T2"}
    assert spec.labels == {"background": 0, "edema": 1, "core": 2}
    assert spec.num_training == 2 and spec.file_ending == ".nii.gz"
    assert "tensorImageSize" not in spec.extra and spec.extra["licence"] == "CC0"
    report = verify_dataset(out, num_workers=1)
    assert report.ok, report.format()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_single_modality_task_and_label_geometry(tmp_path: Path) -> None:
    task, originals = make_task(tmp_path, "Task04_Mono", cases=1, modalities=1)
    out = convert_msd(task, root=tmp_path, num_workers=1)
    label, label_geometry = read_segmentation(out / "labelsTr" / "fake_000.nii.gz")
    _, image_geometry = read_image(out / "imagesTr" / "fake_000_0000.nii.gz")
    assert image_geometry.mismatch(label_geometry) == []
    assert set(np.unique(label)) <= {0, 1, 2}
    assert load_dataset_spec(out).channel_names == {0: "T1"}


def test_existing_dataset_is_not_replaced_without_overwrite(tmp_path: Path) -> None:
    task, _ = make_task(tmp_path, cases=1)
    out = convert_msd(task, root=tmp_path, num_workers=1)
    marker = out / "imagesTr" / "fake_000_0000.nii.gz"
    before = marker.read_bytes()
    with pytest.raises(DatasetError, match="already exists.*--overwrite"):
        convert_msd(task, root=tmp_path, num_workers=1)
    (out / "stale.txt").write_text("from an old conversion")
    again = convert_msd(task, root=tmp_path, overwrite=True, num_workers=1)
    assert again == out and marker.read_bytes() == before and not (out / "stale.txt").exists()


def test_number_and_name_options_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task, _ = make_task(tmp_path, "MyBrainTask", cases=1)
    with pytest.raises(DatasetError, match="pass --number"):
        convert_msd(task, root=tmp_path)
    code = main(["convert-msd", str(task), "--root", str(tmp_path), "--number", "512", "--name", "Brain", "-np", "2"])
    assert code == 0
    assert "Dataset512_Brain" in capsys.readouterr().out
    assert load_dataset_spec(tmp_path / "raw" / "Dataset512_Brain").num_training == 1


def test_bad_tasks_are_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert-msd", str(tmp_path / "Task01_Nothing"), "--root", str(tmp_path)]) == 1
    assert "dataset.json: not found" in capsys.readouterr().err
    task, _ = make_task(tmp_path, "Task09_Wrong", cases=1)
    data = json.loads((task / "dataset.json").read_text())
    data["modality"] = {"0": "T1", "1": "T2", "2": "FLAIR"}  # the files hold 2 modalities
    (task / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="expected 3 modalities along the 4th axis.*found 2"):
        convert_msd(task, root=tmp_path, num_workers=1)
    assert not (tmp_path / "raw" / "Dataset009_Wrong").exists()
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")]


def test_msd_json_translation() -> None:
    assert task_number_and_name("/x/Task04_Hippocampus") == (4, "Hippocampus")
    assert task_number_and_name("Hippocampus") is None
    converted = msd_to_dataset_json({"modality": {"1": "T2", "0": "FLAIR"}, "labels": {"0": "bg", "2": "b", "1": "a"}},
                                    5, "dataset.json")
    assert converted["channel_names"] == {"0": "FLAIR", "1": "T2"}
    assert converted["labels"] == {"bg": 0, "a": 1, "b": 2} and converted["numTraining"] == 5
    with pytest.raises(DatasetError, match="'modality'"):
        msd_to_dataset_json({"labels": {"0": "bg"}}, 1, "dataset.json")


def test_dataset_templates_are_valid() -> None:
    from autoseg.dataset import parse_dataset_spec

    templates = Path(__file__).resolve().parents[2] / "dataset_templates"
    channels = {}
    for path in sorted(templates.glob("*.json")):
        channels[path.stem] = parse_dataset_spec(json.loads(path.read_text()), str(path)).num_channels
    assert channels == {"ct_single_channel": 1, "mri_multi_channel": 4, "natural_image_rgb_2d": 3}
