"""Evaluation and postprocessing of region datasets (scored on region masks) and ignore-label datasets
(ignore voxels left out), on hand-made arrays and tiny synthetic datasets end to end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoseg.dataset.labels import LabelScheme
from autoseg.dataset.synthetic import DENSE_LABELS_FOLDER, SyntheticSpec, generate
from autoseg.evaluation import evaluate_folders
from autoseg.evaluation.metrics import case_metrics, class_metrics
from autoseg.contracts.postprocessing import PostprocessingRules, apply_postprocessing
from autoseg.evaluation.postprocessing import candidate_dice, decide_postprocessing
from autoseg.io import Geometry, read_segmentation, write_segmentation

BRATS = LabelScheme.from_labels({"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]}, [1, 2, 3])


def test_annotated_mask_cuts_counts_and_true_negatives() -> None:
    reference = np.array([1, 1, 0, 0, 0, 0], bool)
    prediction = np.array([1, 0, 1, 0, 1, 1], bool)
    annotated = np.array([1, 1, 1, 1, 0, 0], bool)  # the last two voxels are ignore
    values = class_metrics(reference, prediction, (1.0,), surface=False, annotated=annotated)
    assert (values["tp"], values["fp"], values["fn"], values["tn"]) == (1.0, 1.0, 1.0, 1.0)
    assert values["dice"] == pytest.approx(0.5)
    full = class_metrics(reference, prediction, (1.0,), surface=False)
    assert full["fp"] == 3.0 and full["dice"] == pytest.approx(2 / 6)


def test_surface_of_prediction_in_ignore_area_is_not_seen() -> None:
    reference = np.zeros((1, 12), np.int8)
    reference[0, 2:5] = 1
    reference[0, 8:] = 2  # ignore
    prediction = reference.copy()
    prediction[0, 8:] = 1  # a far object predicted where nothing is annotated
    ignore = case_metrics(reference, prediction, [1], (1.0, 1.0), ignore_value=2)[1]
    assert ignore["dice"] == 1.0 and ignore["hd95"] == 0.0 and ignore["nsd"] == 1.0
    assert case_metrics(reference, prediction, [1], (1.0, 1.0))[1]["hd95"] > 0.0


def test_case_metrics_on_region_masks() -> None:
    reference = np.array([[0, 1, 2, 3]])
    prediction = np.array([[0, 2, 2, 2]])  # every voxel right in "whole", enhancing missed
    regions = {1: [1, 2, 3], 2: [2, 3], 3: [3]}
    values = case_metrics(reference, prediction, [1, 2, 3], (1.0, 1.0), regions=regions)
    assert values[1]["dice"] == 1.0
    assert values[2]["dice"] == pytest.approx(2 * 2 / (3 + 2))  # core: ref {2, 3}, pred {1, 2, 3}
    assert values[3]["dice"] == 0.0


def _write_predictions(dataset: Path, out: Path, source: str, change) -> None:
    out.mkdir()
    for path in sorted((dataset / source).glob("*.nii.gz")):
        label, geometry = read_segmentation(path)
        write_segmentation(change(label.copy()), geometry, out / path.name)


def test_region_dataset_evaluates_per_region_with_region_names(tmp_path: Path) -> None:
    dataset = generate(tmp_path / "Dataset220_Regions", SyntheticSpec(num_cases=2, shape=(10, 20, 20), channels=4,
                                                                      kind="regions", seed=6))
    def demote(label: np.ndarray) -> np.ndarray:  # enhancing predicted as core: whole and core stay perfect
        label[label == 3] = 2
        return label
    _write_predictions(dataset, tmp_path / "pred", "labelsTr", demote)
    summary = evaluate_folders(tmp_path / "pred", dataset / "labelsTr", num_workers=1)
    assert summary.ok and summary.labels == [1, 2, 3]
    assert summary.label_names == {"1": "whole", "2": "core", "3": "enhancing"}
    assert summary.regions == {"1": [1, 2, 3], "2": [2, 3], "3": [3]} and summary.ignore_value is None
    assert summary.mean["1"]["dice"] == 1.0 and summary.mean["2"]["dice"] == 1.0
    assert summary.mean["3"]["dice"] == 0.0  # plain per-value scoring would have given class 2 < 1
    assert summary.mean_foreground_dice == pytest.approx(2 / 3)


def test_sparse_dataset_scores_only_annotated_voxels(tmp_path: Path) -> None:
    dataset = generate(tmp_path / "Dataset221_Sparse", SyntheticSpec(num_cases=2, shape=(10, 20, 20), kind="sparse",
                                                                     seed=7))
    # predicting the dense truth is perfect on the annotated slices, though it differs on every ignore voxel
    _write_predictions(dataset, tmp_path / "pred", DENSE_LABELS_FOLDER, lambda label: label)
    summary = evaluate_folders(tmp_path / "pred", dataset / "labelsTr", num_workers=1)
    assert summary.ok and summary.labels == [1, 2] and summary.ignore_value == 3
    assert summary.mean["1"]["dice"] == 1.0 and summary.mean["2"]["dice"] == 1.0
    sparse, _ = read_segmentation(dataset / "labelsTr" / "case_000.nii.gz")
    case = next(c for c in summary.per_case if c["case_id"] == "case_000")
    assert case["metrics"]["1"]["tp"] == float(np.count_nonzero(sparse == 1))
    assert case["metrics"]["1"]["tn"] + case["metrics"]["1"]["tp"] == float(np.count_nonzero(sparse != 3))
    # and against the dense truth (no ignore voxels there) the same prediction is perfect as well
    dense = evaluate_folders(tmp_path / "pred", dataset / DENSE_LABELS_FOLDER, num_workers=1)
    assert dense.mean["1"]["dice"] == 1.0


def _stray_core() -> tuple[np.ndarray, np.ndarray]:
    reference = np.zeros((1, 3, 12), np.uint8)
    reference[0, :, 1:10] = 1
    reference[0, 1, 2:5] = 2
    reference[0, 1, 3] = 3
    prediction = reference.copy()
    prediction[0, 1, 8] = 2  # a stray core voxel inside the whole tumour
    return reference, prediction


def test_region_rule_repaints_removed_voxels_from_the_remaining_regions() -> None:
    reference, prediction = _stray_core()
    rules = PostprocessingRules(largest_component_labels=[2], labels=[1, 2, 3],
                                regions={"1": [1, 2, 3], "2": [2, 3], "3": [3]}, regions_class_order=[1, 2, 3])
    out = apply_postprocessing(prediction, rules)
    assert np.array_equal(out, reference)  # the stray core became whole tumour (1), not background
    assert PostprocessingRules.from_json(rules.to_json()) == rules


def test_region_candidates_and_decision(tmp_path: Path) -> None:
    reference, prediction = _stray_core()
    result = candidate_dice(reference, prediction, [1, 2, 3], BRATS)
    assert result["none"][2] < 1.0 and result["label"][2] == 1.0 and result["label"][1] == 1.0
    geometry = Geometry(reference.shape, (1.0, 1.0, 1.0), (0.0,) * 3, tuple(np.eye(3).ravel()))
    pairs = []
    for index in range(2):
        write_segmentation(prediction, geometry, tmp_path / f"p{index}.nii.gz")
        write_segmentation(reference, geometry, tmp_path / f"r{index}.nii.gz")
        pairs.append((tmp_path / f"p{index}.nii.gz", tmp_path / f"r{index}.nii.gz"))
    rules = decide_postprocessing(pairs, [1, 2, 3], num_workers=1, label_scheme=BRATS)
    assert rules.largest_component_labels == [2] and rules.regions["2"] == [2, 3]
    assert rules.regions_class_order == [1, 2, 3]


def test_ignore_voxels_do_not_count_against_a_rule() -> None:
    scheme = LabelScheme.from_labels({"background": 0, "a": 1, "ignore": 2})
    reference = np.zeros((1, 1, 12), np.uint8)
    reference[0, 0, 1:4] = 1
    reference[0, 0, 8:] = 2
    prediction = np.zeros_like(reference)
    prediction[0, 0, 1:4] = 1
    prediction[0, 0, 9] = 1  # predicted inside the unannotated area
    assert candidate_dice(reference, prediction, [1], scheme)["none"][1] == 1.0
    assert candidate_dice(reference, prediction, [1])["none"][1] < 1.0
