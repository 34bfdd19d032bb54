"""Metrics against hand-computed answers and an independent brute-force implementation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from autoseg.evaluation.metrics import (
    aggregate,
    case_metrics,
    class_metrics,
    dice_from_counts,
    image_diagonal_mm,
    mean_dice,
    reported_dice,
)


def _box(shape, starts, stops):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(starts, stops))] = True
    return mask


# ------------------------------------------------------------------------------------------ overlap
def test_dice_iou_precision_recall_of_overlapping_boxes():
    reference = _box((10, 10, 10), (0, 0, 0), (4, 5, 5))  # 100 voxels
    prediction = _box((10, 10, 10), (2, 0, 0), (6, 5, 5))  # 100 voxels, 50 shared
    m = class_metrics(reference, prediction, (2.0, 1.0, 0.5))
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (50, 50, 50, 850)
    assert m["dice"] == pytest.approx(0.5)
    assert m["iou"] == pytest.approx(50 / 150)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    assert m["volume_reference_mm3"] == pytest.approx(100 * 1.0)  # voxel volume 2 * 1 * 0.5 mm^3


def test_identical_masks_are_perfect():
    mask = _box((12, 12, 12), (3, 3, 3), (9, 8, 7))
    m = class_metrics(mask, mask, (3.0, 1.0, 1.0), tolerance_mm=0.0)
    assert (m["dice"], m["iou"], m["hd95"], m["nsd"]) == (1.0, 1.0, 0.0, 1.0)


# ------------------------------------------------------------------------------------------ empties
def test_both_empty_is_perfect_and_finite():
    empty = np.zeros((5, 6, 7), bool)
    m = class_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert (m["dice"], m["iou"], m["hd95"], m["nsd"], m["precision"], m["recall"]) == (1, 1, 0, 1, 1, 1)
    assert m["reference_empty"] == 1.0 and m["prediction_empty"] == 1.0


def test_dice_is_undefined_when_both_are_empty_and_evaluation_reports_one():
    """One Dice function (the trainer's pseudo-Dice uses it too): NaN for 0/0; evaluation reports 1 there."""
    assert dice_from_counts(3, 1, 1) == reported_dice(3, 1, 1) == 0.75  # 6 / 8
    assert dice_from_counts(0, 2, 0) == reported_dice(0, 2, 0) == 0.0
    assert math.isnan(dice_from_counts(0, 0, 0)) and reported_dice(0, 0, 0) == 1.0
    label = np.zeros((4, 4), np.uint8)
    label[:2] = 1
    assert mean_dice(label, label, [1, 2]) == {1: 1.0, 2: 1.0}  # label 2 in neither: reported as 1


@pytest.mark.parametrize("which", ["reference", "prediction"])
def test_one_empty_gets_zero_overlap_and_diagonal_hd95(which):
    shape, spacing = (5, 6, 7), (3.0, 1.0, 0.5)
    mask = _box(shape, (1, 1, 1), (3, 3, 3))
    empty = np.zeros(shape, bool)
    reference, prediction = (empty, mask) if which == "reference" else (mask, empty)
    m = class_metrics(reference, prediction, spacing)
    assert m["dice"] == 0.0 and m["iou"] == 0.0 and m["nsd"] == 0.0
    assert m["hd95"] == pytest.approx(math.sqrt(15.0**2 + 6.0**2 + 3.5**2))
    assert m["hd95"] == pytest.approx(image_diagonal_mm(shape, spacing))
    if which == "reference":  # all predicted voxels are false positives; nothing to recall
        assert (m["precision"], m["recall"]) == (0.0, 1.0)
    else:  # nothing predicted, so nothing predicted wrongly; everything missed
        assert (m["precision"], m["recall"]) == (1.0, 0.0)


# ------------------------------------------------------------------------------------------ surfaces by hand
def test_single_voxels_at_anisotropic_spacing_2d():
    reference = np.zeros((8, 8), bool)
    prediction = np.zeros((8, 8), bool)
    reference[2, 2] = True
    prediction[2, 5] = True  # 3 voxels along x at 0.5 mm = 1.5 mm
    assert class_metrics(reference, prediction, (2.0, 0.5))["hd95"] == pytest.approx(1.5)
    assert class_metrics(reference, prediction, (2.0, 0.5), tolerance_mm=1.0)["nsd"] == 0.0
    assert class_metrics(reference, prediction, (2.0, 0.5), tolerance_mm=1.5)["nsd"] == 1.0
    prediction[:] = False
    prediction[4, 2] = True  # 2 voxels along y at 2 mm = 4 mm
    assert class_metrics(reference, prediction, (2.0, 0.5))["hd95"] == pytest.approx(4.0)


def test_box_grown_by_one_slice_each_side_at_anisotropic_spacing():
    # Reference: 10^3 cube; prediction: the same cube with one extra slice above and below (z spacing 3 mm).
    # Prediction surface (560 voxels): 200 on its top/bottom faces lie 3 mm from the reference, 360 on it.
    # Reference surface (488 voxels): 360 on the prediction surface; the 2 x 64 face-interior voxels lie
    # min(3 mm, in-plane distance to a side wall) away: per face 28 x 1 mm, 20 x 2 mm, 16 x 3 mm.
    shape, spacing = (24, 20, 20), (3.0, 1.0, 1.0)
    reference = _box(shape, (5, 5, 5), (15, 15, 15))
    prediction = _box(shape, (4, 5, 5), (16, 15, 15))
    m = class_metrics(reference, prediction, spacing, tolerance_mm=1.5)
    assert m["hd95"] == pytest.approx(3.0)
    assert m["nsd"] == pytest.approx((360 + 360 + 56) / (560 + 488))
    assert class_metrics(reference, prediction, spacing, tolerance_mm=2.5)["nsd"] == pytest.approx(
        (360 + 360 + 56 + 40) / 1048
    )
    assert class_metrics(reference, prediction, spacing, tolerance_mm=3.0)["nsd"] == 1.0
    assert m["dice"] == pytest.approx(2 * 1000 / (1000 + 1200))


def _ball(shape, spacing, centre_mm, radius_mm):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm**2


def test_concentric_spheres_at_anisotropic_spacing():
    # Two concentric balls 3 mm apart in radius: every surface distance is 3 mm up to the voxel grid.
    shape, spacing = (30, 60, 60), (1.5, 0.6, 0.6)
    centre = (22.5, 18.0, 18.0)
    reference = _ball(shape, spacing, centre, 12.0)
    prediction = _ball(shape, spacing, centre, 15.0)
    m = class_metrics(reference, prediction, spacing, tolerance_mm=1.0)
    assert abs(m["hd95"] - 3.0) <= 1.5  # within the coarsest voxel size
    assert m["nsd"] < 0.1
    assert class_metrics(reference, prediction, spacing, tolerance_mm=4.5)["nsd"] == 1.0
    assert m["dice"] == pytest.approx(2 * 12**3 / (12**3 + 15**3), abs=0.02)  # volumes ~ r^3


# ------------------------------------------------------------------------------------------ brute force
def _surface_brute_force(mask):
    """Mask voxels with a face-neighbour outside the mask or outside the array, by explicit shifts."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    all_inside = np.ones(mask.shape, bool)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            all_inside &= np.roll(padded, step, axis=axis)[inner]
    return mask & ~all_inside


def _brute_force(reference, prediction, spacing, tolerance):
    sr = np.argwhere(_surface_brute_force(reference)) * np.asarray(spacing)
    sp = np.argwhere(_surface_brute_force(prediction)) * np.asarray(spacing)
    distances = cdist(sp, sr)
    p_to_r, r_to_p = distances.min(axis=1), distances.min(axis=0)
    hd95 = max(np.percentile(p_to_r, 95), np.percentile(r_to_p, 95))
    nsd = (np.sum(p_to_r <= tolerance) + np.sum(r_to_p <= tolerance)) / (len(p_to_r) + len(r_to_p))
    return hd95, nsd


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_brute_force_on_random_masks(dims, seed):
    rng = np.random.default_rng(seed)
    shape = (9, 11, 10)[-dims:] if dims == 3 else (23, 19)
    spacing = tuple(rng.uniform(0.4, 3.0, dims))
    reference = rng.random(shape) < 0.3
    prediction = rng.random(shape) < 0.3
    # keep some blobs away from the border and some touching it, so cropping and the border both matter
    reference[(slice(0, 2),) * dims] = True
    tolerance = float(rng.uniform(0.5, 2.5))
    m = class_metrics(reference, prediction, spacing, tolerance_mm=tolerance)
    hd95, nsd = _brute_force(reference, prediction, spacing, tolerance)
    assert abs(m["hd95"] - hd95) < 1e-6
    assert abs(m["nsd"] - nsd) < 1e-6


def test_small_blobs_inside_a_large_image_are_cropped_exactly():
    rng = np.random.default_rng(7)
    shape, spacing = (40, 50, 45), (2.5, 0.8, 0.7)
    reference = np.zeros(shape, bool)
    prediction = np.zeros(shape, bool)
    reference[10:14, 20:27, 5:9] = rng.random((4, 7, 4)) < 0.7
    prediction[11:15, 22:30, 30:34] = rng.random((4, 8, 4)) < 0.7
    m = class_metrics(reference, prediction, spacing, tolerance_mm=2.0)
    hd95, nsd = _brute_force(reference, prediction, spacing, 2.0)
    assert abs(m["hd95"] - hd95) < 1e-6 and abs(m["nsd"] - nsd) < 1e-6


# ------------------------------------------------------------------------------------------ aggregation
def test_case_metrics_and_aggregate():
    reference = np.zeros((6, 6), np.uint8)
    prediction = np.zeros((6, 6), np.uint8)
    reference[0:2, 0:2] = 1
    prediction[0:2, 0:2] = 1
    reference[4:6, 4:6] = 2  # class 2 missed entirely
    cases = [case_metrics(reference, prediction, [1, 2], (1.0, 1.0)), case_metrics(reference, reference, [1, 2], (1.0, 1.0))]
    summary = aggregate(cases, [1, 2])
    assert summary["per_label"][1]["dice"] == 1.0
    assert summary["per_label"][2]["dice"] == pytest.approx(0.5)
    assert summary["per_label"][2]["n"] == 2
    assert summary["foreground"]["dice"] == pytest.approx(0.75)
    assert summary["per_label"][2]["hd95"] == pytest.approx(math.sqrt(72) / 2)


def test_aggregate_refuses_nan_and_reports_missing_label_as_none():
    with pytest.raises(ValueError, match="dice"):
        aggregate([{1: {"dice": float("nan")}}], [1])
    summary = aggregate([{1: {"dice": 1.0}}], [1, 3])
    assert summary["per_label"][3]["dice"] is None and summary["per_label"][3]["n"] == 0
    assert summary["foreground"]["dice"] == 1.0
