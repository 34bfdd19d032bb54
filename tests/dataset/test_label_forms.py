"""`autoseg verify` and `convert-msd --regions` on region and ignore-label datasets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.cli import main
from autoseg.dataset import load_dataset_spec
from autoseg.dataset.msd import convert_msd
from autoseg.dataset.synthetic import DENSE_LABELS_FOLDER, SyntheticSpec, generate
from autoseg.dataset.verify import verify_dataset
from autoseg.errors import DatasetError
from autoseg.io import read_segmentation, write_segmentation

from test_msd import make_task  # tests/dataset has no __init__: pytest puts this folder on sys.path

REGIONS = SyntheticSpec(num_cases=2, shape=(10, 16, 16), spacing=(2.0, 1.0, 1.0), channels=4, kind="regions", seed=1)
SPARSE = SyntheticSpec(num_cases=2, shape=(10, 16, 16), spacing=(2.0, 1.0, 1.0), kind="sparse", seed=2)


def test_region_dataset_verifies_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = generate(tmp_path / "Dataset200_Regions", REGIONS)
    assert main(["verify", str(dataset), "-np", "1"]) == 0, capsys.readouterr().out
    spec = load_dataset_spec(dataset)
    assert spec.label_scheme.output_names == ["whole", "core", "enhancing"] and spec.regions_class_order == [1, 2, 3]
    label, _ = read_segmentation(dataset / "labelsTr" / "case_000.nii.gz")
    assert set(np.unique(label).tolist()) == {0, 1, 2, 3}  # region member values, none declared on its own


def test_sparse_dataset_verifies_clean_and_keeps_the_dense_truth(tmp_path: Path) -> None:
    dataset = generate(tmp_path / "Dataset201_Sparse", SPARSE)
    assert verify_dataset(dataset, num_workers=1).ok
    sparse, _ = read_segmentation(dataset / "labelsTr" / "case_000.nii.gz")
    dense, _ = read_segmentation(dataset / DENSE_LABELS_FOLDER / "case_000.nii.gz")
    annotated = sparse != 3
    assert annotated.any() and not annotated.all()
    assert annotated[1::3].all() and not annotated[0::3].any()  # every third slice, starting at 1
    assert np.array_equal(sparse[annotated], dense[annotated]) and 3 not in dense


def test_undeclared_value_next_to_ignore_is_still_reported(tmp_path: Path) -> None:
    dataset = generate(tmp_path / "Dataset201_Sparse", SPARSE)
    path = dataset / "labelsTr" / "case_001.nii.gz"
    label, geometry = read_segmentation(path)
    label[0, 0, 0] = 4  # above ignore (3): declared nowhere
    write_segmentation(label, geometry, path)
    [problem] = [p for p in verify_dataset(dataset, num_workers=1).problems if p.check == "undeclared label value"]
    assert "4 (1 voxels)" in problem.found and "[0, 1, 2, 3]" in problem.expected


def test_invalid_region_json_is_one_dataset_json_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = generate(tmp_path / "Dataset200_Regions", REGIONS)
    data = json.loads((dataset / "dataset.json").read_text())
    del data["regions_class_order"]
    (dataset / "dataset.json").write_text(json.dumps(data))
    assert main(["verify", str(dataset), "-np", "1"]) == 1
    [problem] = [p for p in verify_dataset(dataset, num_workers=1).problems if p.check == "dataset.json"]
    assert "'regions_class_order' is required" in problem.found


def _brats_task(tmp_path: Path) -> Path:
    task, _ = make_task(tmp_path, "Task01_BrainTumour", cases=2, modalities=4)
    data = json.loads((task / "dataset.json").read_text())
    data["modality"] = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    data["labels"] = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    (task / "dataset.json").write_text(json.dumps(data))
    for path in sorted((task / "labelsTr").glob("*.nii.gz")):  # add value 3 to the labels (0..2)
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        array[0, 0, :3] = 3
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(path))
    return task


def test_convert_msd_regions_writes_the_brats_regions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = _brats_task(tmp_path)
    assert main(["convert-msd", str(task), "--root", str(tmp_path), "--regions", "-np", "1"]) == 0
    dataset = tmp_path / "raw" / "Dataset001_BrainTumour"
    data = json.loads((dataset / "dataset.json").read_text())
    assert list(data["labels"]) == ["background", "whole tumour", "tumour core", "enhancing tumour"]  # order kept
    assert data["labels"]["whole tumour"] == [1, 2, 3] and data["regions_class_order"] == [1, 2, 3]
    assert verify_dataset(dataset, num_workers=1).ok
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(task / "labelsTr" / "fake_000.nii.gz")))
    converted, _ = read_segmentation(dataset / "labelsTr" / "fake_000.nii.gz")
    assert np.array_equal(converted, original)  # label files unchanged: the regions are a reading of them


def test_convert_msd_refuses_regions_for_a_task_they_do_not_fit(tmp_path: Path) -> None:
    task, _ = make_task(tmp_path, "Task07_Fake", cases=1, modalities=2)
    with pytest.raises(DatasetError, match="--regions fits BraTS-like tasks .* found 2 channel.*convert this task "
                                           "without --regions"):
        convert_msd(task, root=tmp_path, num_workers=1, regions=True)
    assert not (tmp_path / "raw" / "Dataset007_Fake").exists()
