"""evaluate_folders: summary.json, the table, geometry mismatch and missing files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg.errors import DatasetError
from autoseg.evaluation import evaluate_folders, format_table
from autoseg.evaluation.evaluate import load_summary
from autoseg.evaluation.metrics import confusion_counts, reported_dice
from autoseg.io import Geometry, read_segmentation, write_segmentation

from .project import make_raw


@pytest.fixture()
def folders(tmp_path):
    raw = make_raw(tmp_path, num_cases=4)
    predictions = tmp_path / "pred"
    expected = {}
    for index in range(4):
        case_id = f"case_{index:03d}"
        label, geometry = read_segmentation(raw / "labelsTr" / f"{case_id}.nii.gz")
        prediction = label.copy()
        prediction[prediction == 2] = 0 if index == 0 else 2  # case 0 misses the satellite
        prediction = np.roll(prediction, index, axis=2)  # shifted by `index` voxels along x
        write_segmentation(prediction, geometry, predictions / f"{case_id}.nii.gz")
        expected[case_id] = {k: reported_dice(*confusion_counts(label == k, prediction == k)[:3]) for k in (1, 2)}
    return raw, predictions, expected


def test_summary_json_matches_direct_computation(folders):
    raw, predictions, expected = folders
    summary = evaluate_folders(predictions, raw / "labelsTr", num_workers=2)
    assert summary.ok and summary.labels == [1, 2]  # from dataset.json beside labelsTr
    assert summary.label_names == {"1": "object", "2": "satellite"}
    on_disk = json.loads((predictions / "summary.json").read_text())
    assert on_disk["schema_version"] == 1
    for case in on_disk["per_case"]:
        for label in (1, 2):
            assert case["metrics"][str(label)]["dice"] == pytest.approx(expected[case["case_id"]][label])
    assert on_disk["per_case"][0]["metrics"]["2"]["dice"] == 0.0
    assert on_disk["per_case"][1]["metrics"]["1"]["hd95"] > 0  # shifted, so a real distance
    mean_dice_1 = np.mean([expected[c][1] for c in expected])
    assert on_disk["mean"]["1"]["dice"] == pytest.approx(mean_dice_1)
    fg = (mean_dice_1 + np.mean([expected[c][2] for c in expected])) / 2
    assert summary.mean_foreground_dice == pytest.approx(fg)
    assert load_summary(predictions).mean["2"]["n"] == 4

    table = format_table(summary)
    assert "1 object" in table and "2 satellite" in table and "foreground mean" in table
    assert f"{mean_dice_1:.3f}" in table and "problem" not in table


def test_labels_default_to_values_found_without_dataset_json(tmp_path):
    reference, prediction = tmp_path / "ref", tmp_path / "pred"
    geometry = Geometry((6, 6), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    a = np.zeros((6, 6), np.uint8)
    a[1:3, 1:3] = 3
    b = a.copy()
    b[4, 4] = 5  # a label only one prediction has: evaluated, both-empty elsewhere
    write_segmentation(a, geometry, reference / "x.nii.gz")
    write_segmentation(a, geometry, reference / "y.nii.gz")
    write_segmentation(a, geometry, prediction / "x.nii.gz")
    write_segmentation(b, geometry, prediction / "y.nii.gz")
    summary = evaluate_folders(prediction, reference, num_workers=1, labels=None)
    assert summary.labels == [3, 5]
    assert summary.mean["5"]["dice"] == pytest.approx(0.5)  # x: both empty -> 1, y: false positive -> 0
    assert summary.mean["3"]["dice"] == 1.0


def test_geometry_mismatch_and_missing_reference_are_reported_per_case(folders):
    raw, predictions, _ = folders
    label, geometry = read_segmentation(predictions / "case_001.nii.gz")
    shifted = Geometry(geometry.shape, geometry.spacing, tuple(o + 5.0 for o in geometry.origin), geometry.direction)
    write_segmentation(label, shifted, predictions / "case_001.nii.gz")
    wrong_shape = Geometry((3, 4, 5), geometry.spacing, geometry.origin, geometry.direction)
    write_segmentation(np.zeros((3, 4, 5), np.uint8), wrong_shape, predictions / "case_002.nii.gz")
    write_segmentation(label, geometry, predictions / "case_777.nii.gz")
    summary = evaluate_folders(predictions, raw / "labelsTr", num_workers=1)
    assert not summary.ok
    by_case = {case["case_id"]: case for case in summary.per_case}
    assert any("origin" in item for item in by_case["case_001"]["geometry_mismatch"])
    assert by_case["case_001"]["metrics"]  # still evaluated, on the reference spacing
    assert "shape" in by_case["case_002"]["error"] and not by_case["case_002"]["metrics"]
    assert summary.mean["1"]["n"] == 3  # cases 000, 001 and 003
    table = format_table(summary)
    assert "case_777" in table and "case_002" in table and "origin" in table


def test_missing_prediction_for_requested_case_and_empty_folder(folders, tmp_path):
    raw, predictions, _ = folders
    summary = evaluate_folders(predictions, raw / "labelsTr", num_workers=1, case_ids=["case_000", "case_009"])
    assert not summary.ok and any("case_009" in p for p in summary.problems)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no segmentation files"):
        evaluate_folders(tmp_path / "empty", raw / "labelsTr")
