"""Postprocessing: keep only the largest connected component, where cross-validation says it helps.

The decision follows the published nnU-Net procedure (see ../../docs/evaluation.md): on the cross-validation
predictions, first try "largest component of all foreground together" and keep it if the mean foreground
Dice strictly improves; then, on top of that, try "largest component of class c" for each class and keep each
rule whose class Dice strictly improves. Removed voxels become background (0).

Region datasets (docs/datasets.md) are decided and applied per region: the rule "largest component of
region r" takes region r's mask (the voxels holding any of its values), keeps its largest component, and
repaints only the removed voxels from the region masks that remain, in ``regions_class_order`` (a stray
"tumour core" blob inside the whole tumour becomes whole tumour again, not background). A rule is kept when
its own region's Dice improves; the voxels it removes also leave the regions nested inside it, which the
decision does not weigh. Keys of region rules are the region numbers ``1..R`` of the evaluation summary.

The rules, ``postprocessing.json`` (schema version 1, in the results folder of the model it belongs to) and
their application are the contract in :mod:`autoseg.contracts.postprocessing`, which inference reads without
importing evaluation; this module decides the rules.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np

from autoseg.contracts.postprocessing import (
    PostprocessingRules,
    keep_largest_component,
    keep_largest_region,
    largest_component,
)
from autoseg.dataset.labels import LabelScheme
from autoseg.errors import ConfigurationError
from autoseg.evaluation.parallel import run_all
from autoseg.io import read_segmentation

log = logging.getLogger(__name__)


def _dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    from autoseg.evaluation.metrics import confusion_counts, reported_dice

    return reported_dice(*confusion_counts(reference, prediction)[:3])


def candidate_dice(
    reference: np.ndarray, prediction: np.ndarray, labels: Sequence[int], scheme: LabelScheme | None = None
) -> dict[str, dict[int, float]]:
    """Dice per label of one case under every candidate rule set.

    Returns ``{"none", "foreground", "label", "foreground+label": {label: Dice}}``: unchanged; all-foreground
    largest component; largest component of that label alone; both. Removing voxels of label c only changes
    label c's Dice, so per-label rules can be decided independently of each other. ``scheme`` with regions:
    ``labels`` are region keys ``1..R``, scored on region masks, the rule applied as
    :func:`~autoseg.contracts.postprocessing.apply_postprocessing` applies it. A scheme with an ignore label:
    predicted voxels where the reference is ignore are left out of every Dice (as evaluation leaves them out).
    """
    foreground = keep_largest_component(prediction, prediction != 0)
    result: dict[str, dict[int, float]] = {"none": {}, "foreground": {}, "label": {}, "foreground+label": {}}
    if scheme is not None and scheme.ignore_value is not None:
        annotated = reference != scheme.ignore_value

        def dice(reference_mask: np.ndarray, prediction_mask: np.ndarray) -> float:
            return _dice(reference_mask, prediction_mask & annotated)
    else:
        dice = _dice
    if scheme is not None and scheme.has_regions:
        for key in labels:
            values = scheme.regions[key - 1][1]
            reference_mask = np.isin(reference, values)
            result["none"][key] = dice(reference_mask, np.isin(prediction, values))
            result["foreground"][key] = dice(reference_mask, np.isin(foreground, values))
            result["label"][key] = dice(reference_mask, np.isin(keep_largest_region(prediction, key, scheme), values))
            result["foreground+label"][key] = dice(
                reference_mask, np.isin(keep_largest_region(foreground, key, scheme), values))
        return result
    for label in labels:
        reference_mask = reference == label
        result["none"][label] = dice(reference_mask, prediction == label)
        result["foreground"][label] = dice(reference_mask, foreground == label)
        result["label"][label] = dice(reference_mask, largest_component(prediction == label))
        result["foreground+label"][label] = dice(reference_mask, largest_component(foreground == label))
    return result


def _candidate_dice_job(job: tuple[str, str, list[int], dict[str, Any] | None]) -> dict[str, dict[int, float]]:
    prediction_path, reference_path, labels, scheme_json = job
    prediction, _ = read_segmentation(prediction_path)
    reference, _ = read_segmentation(reference_path)
    if prediction.shape != reference.shape:
        raise ConfigurationError(
            f"{prediction_path}: shape {prediction.shape} differs from reference {reference.shape}; "
            "postprocessing can only be decided on predictions in the reference grid"
        )
    scheme = None if scheme_json is None else LabelScheme.from_json(scheme_json)
    return candidate_dice(reference, prediction, labels, scheme)


def choose_rules(per_case: Sequence[dict[str, dict[int, float]]], labels: Sequence[int]) -> PostprocessingRules:
    """Decide the rules from :func:`candidate_dice` results of every cross-validation case.

    All-foreground first (kept when the mean over labels of the mean Dice strictly improves), then each label
    on top of that choice (kept when that label's mean Dice strictly improves)."""
    labels = [int(v) for v in labels]
    if not per_case or not labels:
        return PostprocessingRules(labels=labels, num_cases=len(per_case))

    def mean(variant: str, label: int) -> float:
        return float(np.mean([case[variant][label] for case in per_case]))

    before = {label: mean("none", label) for label in labels}
    with_foreground = {label: mean("foreground", label) for label in labels}
    use_foreground = float(np.mean(list(with_foreground.values()))) > float(np.mean(list(before.values())))
    base_variant, label_variant = ("foreground", "foreground+label") if use_foreground else ("none", "label")
    chosen, after = [], {}
    for label in labels:
        current, candidate = mean(base_variant, label), mean(label_variant, label)
        if candidate > current:
            chosen.append(label)
            after[label] = candidate
        else:
            after[label] = current
    return PostprocessingRules(
        foreground_largest_component=use_foreground,
        largest_component_labels=chosen,
        labels=labels,
        dice_before={str(k): v for k, v in before.items()},
        dice_after={str(k): v for k, v in after.items()},
        num_cases=len(per_case),
    )


def decide_postprocessing(
    pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
    labels: Sequence[int],
    num_workers: int = 2,
    label_scheme: LabelScheme | None = None,
) -> PostprocessingRules:
    """Decide largest-component rules on cross-validation predictions.

    ``pairs``: ``(prediction_file, reference_file)`` per case (label maps in the same grid); ``labels``: the
    foreground labels, or for a region ``label_scheme`` the region keys ``1..R``. Cases are read in
    ``num_workers`` processes.
    """
    labels = [int(v) for v in labels if int(v) != 0]
    regions = label_scheme is not None and label_scheme.has_regions
    scheme_json = None if label_scheme is None else label_scheme.to_json()
    jobs = [(str(p), str(r), labels, scheme_json) for p, r in pairs]
    results = run_all(_candidate_dice_job, jobs, num_workers, "postprocessing")
    rules = choose_rules(results, labels)
    if regions:
        assert label_scheme is not None
        rules.regions = {str(key): list(label_scheme.regions[key - 1][1])
                         for key in range(1, len(label_scheme.regions) + 1)}
        rules.regions_class_order = list(label_scheme.regions_class_order or [])
    log.info("postprocessing decided on %d cases: %s", len(results), rules.describe())
    return rules
