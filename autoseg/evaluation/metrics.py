"""Segmentation metrics per case and class, in physical units (mm).

Overlap metrics (Dice, IoU, precision, recall) come from the voxel confusion counts. Surface metrics (HD95,
normalised surface Dice) come from the *surface voxels* of each mask: the voxels of the mask with at least one
face-neighbour outside it (``mask XOR erosion(mask)``, erosion with the face-connected structuring element and
voxels outside the image counted as background). Distances between surfaces are Euclidean in mm, from
``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``.

Conventions (stated once here, repeated in docs/evaluation.md):

- Dice of a class absent from both masks is 0/0, undefined: :func:`dice_from_counts` returns **NaN** there
  (the one Dice function, shared with the trainer's pseudo-Dice, which leaves such classes out of its mean).
  Evaluation *reports* **1** for it (nothing to get right and nothing got wrong): :func:`reported_dice`, the
  one place that says so, used by the case metrics, ``mean_dice`` and the postprocessing decision.
- Other ``a / b`` with ``b == 0`` are **1** by the same reasoning: IoU is 1 when both masks are empty;
  precision is 1 when the prediction is empty; recall is 1 when the reference is empty.
- Dice/IoU/NSD are 0 when exactly one mask is empty.
- HD95 is 0 when both masks are empty and the **image diagonal in mm** (the largest distance possible
  inside the image) when exactly one is empty, so every value is finite and a missed object is penalised
  more than any real contour error.
- HD95 is the larger of the two directed 95th percentiles (prediction -> reference and reference ->
  prediction, numpy's linear interpolation), the definition MONAI and most challenge code use.
- NSD (surface Dice at tolerance tau, Nikolov et al. 2021) counts surface *voxels* rather than surfel areas:
  ``(|{p in S_pred: d(p, S_ref) <= tau}| + |{r in S_ref: d(r, S_pred) <= tau}|) / (|S_pred| + |S_ref|)``.

Every function works for 2D (``[Y, X]``) and 3D (``[Z, Y, X]``) masks; spacing is in the same axis order.

Region datasets and the ignore label (docs/datasets.md):

- A scored unit is a class (the voxels holding one label value) or a region (the voxels holding any of its
  values, ``regions`` in :func:`case_metrics`); reference and prediction are both turned into the unit's mask.
- Voxels whose *reference* is the ignore value are unannotated and left out of everything: the prediction
  is cut to the annotated voxels before counting (so TP/FP/FN/TN and the volumes count annotated voxels only)
  and before its surface is taken. The choice for surfaces: where a predicted object runs into an
  unannotated area, the cut edge counts as prediction surface, so HD95/NSD measure the prediction as seen
  through the annotation; a predicted object lying wholly in the unannotated area is not seen at all.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

# Metric names in the order tables show them; all are floats.
METRIC_NAMES = ("dice", "iou", "hd95", "nsd", "precision", "recall")
COUNT_NAMES = ("tp", "fp", "fn", "tn", "volume_reference_mm3", "volume_prediction_mm3")


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` with the 0/0 = 1 convention (nothing to find and nothing found wrong)."""
    return 1.0 if denominator == 0 else float(numerator) / float(denominator)


def confusion_counts(reference: np.ndarray, prediction: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) voxel counts of two boolean masks of equal shape."""
    reference = np.asarray(reference, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    tp = int(np.count_nonzero(reference & prediction))
    predicted = int(np.count_nonzero(prediction))
    present = int(np.count_nonzero(reference))
    fp = predicted - tp
    fn = present - tp
    tn = int(reference.size) - tp - fp - fn
    return tp, fp, fn, tn


def dice_from_counts(tp: float, fp: float, fn: float) -> float:
    """Dice = 2 TP / (2 TP + FP + FN) of one class from its voxel counts; **NaN** when the class is absent from
    both reference and prediction (TP = FP = FN = 0).

    Why NaN: Dice is 0/0 there, undefined; there is no overlap to measure. What should stand in for it depends
    on the use: evaluation reports 1 (:func:`reported_dice`), the trainer's pseudo-Dice leaves the class out of
    its mean (a validation batch without the class says nothing about it). NaN makes each caller choose, so one
    use's convention cannot leak into the other's numbers.

    >>> dice_from_counts(3, 1, 1), dice_from_counts(0, 0, 2)
    (0.75, 0.0)
    >>> import math; math.isnan(dice_from_counts(0, 0, 0))
    True
    """
    denominator = 2 * tp + fp + fn
    return float(2 * tp) / float(denominator) if denominator > 0 else float("nan")


def reported_dice(tp: float, fp: float, fn: float) -> float:
    """The Dice evaluation reports: :func:`dice_from_counts`, with **1** for a class absent from both masks
    (nothing to get right and nothing got wrong), so every reported value is finite and a correctly empty
    prediction scores as well as a perfect one."""
    dice = dice_from_counts(tp, fp, fn)
    return 1.0 if math.isnan(dice) else dice


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    """IoU (Jaccard) = TP / (TP + FP + FN); 1 when both masks are empty."""
    return _ratio(tp, tp + fp + fn)


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the image diagonal: the HD95 given when exactly one mask is empty."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding all True voxels of ``mask``, grown by ``margin`` voxels and clipped
    to the array; None when the mask is empty."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        line = np.any(mask, axis=other) if other else mask
        hits = np.flatnonzero(line)
        if hits.size == 0:
            return None
        slices.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(slices)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of a boolean mask: mask voxels with a face-neighbour outside the mask (or outside the
    array). Shape as ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def surface_distances(
    reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm between two non-empty boolean masks.

    Returns ``(prediction_to_reference, reference_to_prediction)``: for every surface voxel of the prediction
    its distance to the nearest reference surface voxel, and vice versa (1D float64 arrays).

    Both masks are first cropped to the bounding box of their union plus one voxel: the nearest surface voxel
    of either mask lies inside that box, so distances are exact, and the distance transforms run on a small
    array instead of the whole image. The one-voxel margin keeps the surfaces identical to the uncropped ones
    (a mask touching the crop border would otherwise gain a false surface there).
    """
    reference = np.asarray(reference, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    box = bounding_box(reference | prediction, margin=1)
    if box is None or not reference.any() or not prediction.any():
        raise ValueError("surface_distances needs two non-empty masks")
    reference, prediction = reference[box], prediction[box]
    spacing = tuple(float(s) for s in spacing)
    surface_reference = surface_voxels(reference)
    surface_prediction = surface_voxels(prediction)
    # distance_transform_edt gives each non-zero voxel its distance to the nearest zero voxel: make the
    # surface the zeros.
    to_reference = ndimage.distance_transform_edt(~surface_reference, sampling=spacing)
    to_prediction = ndimage.distance_transform_edt(~surface_prediction, sampling=spacing)
    return to_reference[surface_prediction], to_prediction[surface_reference]


def hd95_from_distances(prediction_to_reference: np.ndarray, reference_to_prediction: np.ndarray) -> float:
    """95th-percentile Hausdorff distance (mm): the larger of the two directed 95th percentiles."""
    return float(max(np.percentile(prediction_to_reference, 95), np.percentile(reference_to_prediction, 95)))


def nsd_from_distances(
    prediction_to_reference: np.ndarray, reference_to_prediction: np.ndarray, tolerance_mm: float
) -> float:
    """Normalised surface Dice: fraction of both surfaces lying within ``tolerance_mm`` of the other one."""
    within = np.count_nonzero(prediction_to_reference <= tolerance_mm) + np.count_nonzero(
        reference_to_prediction <= tolerance_mm
    )
    return _ratio(within, prediction_to_reference.size + reference_to_prediction.size)


def class_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 1.0,
    surface: bool = True,
    annotated: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics of one class in one case.

    ``reference`` and ``prediction``: boolean masks ``[(Z,) Y, X]`` of equal shape; ``spacing`` in mm, array
    order. Returns the floats named in METRIC_NAMES and COUNT_NAMES (counts as floats for JSON uniformity)
    plus ``reference_empty`` / ``prediction_empty`` (0.0 or 1.0). ``surface=False`` skips the distance
    transforms: the ``hd95`` and ``nsd`` keys are then absent rather than filled with invented values.
    ``annotated``: boolean mask of the voxels that count (False on the reference's ignore voxels); both masks
    are cut to it and TN counts only annotated voxels (module docstring).
    """
    reference = np.asarray(reference, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} differs from prediction shape {prediction.shape}")
    if len(spacing) != reference.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} entries for a {reference.ndim}D mask")
    if annotated is not None:
        annotated = np.asarray(annotated, dtype=bool)
        if annotated.shape != reference.shape:
            raise ValueError(f"annotated shape {annotated.shape} differs from reference shape {reference.shape}")
        reference, prediction = reference & annotated, prediction & annotated
    tp, fp, fn, tn = confusion_counts(reference, prediction)
    if annotated is not None:
        tn -= int(annotated.size - np.count_nonzero(annotated))  # unannotated voxels are no true negatives
    voxel_volume = float(np.prod(spacing))
    result: dict[str, float] = {
        "dice": reported_dice(tp, fp, fn),
        "iou": iou_from_counts(tp, fp, fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "tp": float(tp),
        "fp": float(fp),
        "fn": float(fn),
        "tn": float(tn),
        "volume_reference_mm3": (tp + fn) * voxel_volume,
        "volume_prediction_mm3": (tp + fp) * voxel_volume,
        "reference_empty": float(tp + fn == 0),
        "prediction_empty": float(tp + fp == 0),
    }
    if surface:
        reference_empty, prediction_empty = tp + fn == 0, tp + fp == 0
        if reference_empty and prediction_empty:
            result["hd95"], result["nsd"] = 0.0, 1.0
        elif reference_empty or prediction_empty:
            result["hd95"], result["nsd"] = image_diagonal_mm(reference.shape, spacing), 0.0
        else:
            to_reference, to_prediction = surface_distances(reference, prediction, spacing)
            result["hd95"] = hd95_from_distances(to_reference, to_prediction)
            result["nsd"] = nsd_from_distances(to_reference, to_prediction, tolerance_mm)
    return result


def unit_mask(segmentation: np.ndarray, key: int, regions: Mapping[int, Sequence[int]] | None = None) -> np.ndarray:
    """Boolean mask of one scored unit: ``segmentation == key``, or, when ``regions`` maps ``key`` to label
    values, the voxels holding any of them."""
    if regions is not None and key in regions:
        return np.isin(segmentation, list(regions[key]))
    return segmentation == key


def case_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    labels: Iterable[int],
    spacing: Sequence[float],
    tolerance_mm: float = 1.0,
    surface: bool = True,
    regions: Mapping[int, Sequence[int]] | None = None,
    ignore_value: int | None = None,
) -> dict[int, dict[str, float]]:
    """``{label: class_metrics}`` for every label of one case (label maps ``[(Z,) Y, X]`` of equal shape).

    ``regions``: ``{key: label values}`` for region datasets; each key in ``labels`` is then scored on the
    region masks of both maps (:func:`unit_mask`). ``ignore_value``: voxels where the *reference* holds it
    are left out (``annotated`` of :func:`class_metrics`)."""
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} differs from prediction shape {prediction.shape}")
    annotated = None if ignore_value is None else reference != ignore_value
    return {
        int(label): class_metrics(unit_mask(reference, int(label), regions), unit_mask(prediction, int(label), regions),
                                  spacing, tolerance_mm, surface, annotated)
        for label in labels
    }


def mean_dice(reference: np.ndarray, prediction: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """``{label: Dice}`` of one case without surface metrics (what postprocessing decisions need)."""
    return {int(label): reported_dice(*confusion_counts(reference == label, prediction == label)[:3])
            for label in labels}


def aggregate(per_case: Sequence[Mapping[Any, Mapping[str, float]]], labels: Iterable[int]) -> dict[str, Any]:
    """Means over cases, per label and over the foreground labels.

    ``per_case``: one ``{label: {metric: value}}`` per case (keys may be int or str). Returns
    ``{"per_label": {label: {metric: mean, ..., "n": cases}}, "foreground": {metric: mean over labels}}``.
    Non-finite values are never averaged silently: a ValueError names the case index, label and metric. A
    label no case has yields ``None`` means (JSON null) and ``n = 0`` rather than NaN.
    """
    labels = [int(label) for label in labels]
    per_label: dict[int, dict[str, Any]] = {}
    for label in labels:
        values: dict[str, list[float]] = {}
        for index, case in enumerate(per_case):
            metrics = case.get(label, case.get(str(label)))  # type: ignore[arg-type]
            if metrics is None:
                continue
            for name in (*METRIC_NAMES, *COUNT_NAMES):
                if name not in metrics:
                    continue
                value = float(metrics[name])
                if not math.isfinite(value):
                    raise ValueError(f"case {index}, label {label}: {name} is {value}; metrics must be finite")
                values.setdefault(name, []).append(value)
        count = max((len(v) for v in values.values()), default=0)
        means: dict[str, Any] = {name: (float(np.mean(v)) if v else None) for name, v in values.items()}
        for name in METRIC_NAMES:
            means.setdefault(name, None)
        means["n"] = count
        per_label[label] = means
    foreground_labels = [label for label in labels if label != 0]
    foreground: dict[str, Any] = {}
    for name in METRIC_NAMES:
        values_fg = [per_label[label][name] for label in foreground_labels if per_label[label][name] is not None]
        foreground[name] = float(np.mean(values_fg)) if values_fg else None
    return {"per_label": per_label, "foreground": foreground}
