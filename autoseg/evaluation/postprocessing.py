"""Postprocessing: keep only the largest connected component, where cross-validation says it helps.

The decision follows the published nnU-Net procedure (see ../../docs/evaluation.md): on the cross-validation
predictions, first try "largest component of all foreground together" and keep it if the mean foreground
Dice strictly improves; then, on top of that, try "largest component of class c" for each class and keep each
rule whose class Dice strictly improves. Removed voxels become background (0).

The rules, ``postprocessing.json`` (schema version 1, in the results folder of the model it belongs to) and
their application are the contract in :mod:`autoseg.contracts.postprocessing`, which inference reads without
importing evaluation; this module decides the rules.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from autoseg.contracts.postprocessing import PostprocessingRules, keep_largest_component, largest_component
from autoseg.errors import ConfigurationError
from autoseg.evaluation.parallel import run_all
from autoseg.io import read_segmentation

log = logging.getLogger(__name__)


def _dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    from autoseg.evaluation.metrics import confusion_counts, reported_dice

    return reported_dice(*confusion_counts(reference, prediction)[:3])


def candidate_dice(reference: np.ndarray, prediction: np.ndarray, labels: Sequence[int]) -> dict[str, dict[int, float]]:
    """Dice per label of one case under every candidate rule set.

    Returns ``{"none", "foreground", "label", "foreground+label": {label: Dice}}``: unchanged; all-foreground
    largest component; largest component of that label alone; both. Removing voxels of label c only changes
    label c's Dice, so per-label rules can be decided independently of each other.
    """
    foreground = keep_largest_component(prediction, prediction != 0)
    result: dict[str, dict[int, float]] = {"none": {}, "foreground": {}, "label": {}, "foreground+label": {}}
    for label in labels:
        reference_mask = reference == label
        result["none"][label] = _dice(reference_mask, prediction == label)
        result["foreground"][label] = _dice(reference_mask, foreground == label)
        result["label"][label] = _dice(reference_mask, largest_component(prediction == label))
        result["foreground+label"][label] = _dice(reference_mask, largest_component(foreground == label))
    return result


def _candidate_dice_job(job: tuple[str, str, list[int]]) -> dict[str, dict[int, float]]:
    prediction_path, reference_path, labels = job
    prediction, _ = read_segmentation(prediction_path)
    reference, _ = read_segmentation(reference_path)
    if prediction.shape != reference.shape:
        raise ConfigurationError(
            f"{prediction_path}: shape {prediction.shape} differs from reference {reference.shape}; "
            "postprocessing can only be decided on predictions in the reference grid"
        )
    return candidate_dice(reference, prediction, labels)


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
) -> PostprocessingRules:
    """Decide largest-component rules on cross-validation predictions.

    ``pairs``: ``(prediction_file, reference_file)`` per case (label maps in the same grid); ``labels``: the
    foreground labels. Cases are read in ``num_workers`` processes.
    """
    labels = [int(v) for v in labels if int(v) != 0]
    jobs = [(str(p), str(r), labels) for p, r in pairs]
    results = run_all(_candidate_dice_job, jobs, num_workers, "postprocessing")
    rules = choose_rules(results, labels)
    log.info("postprocessing decided on %d cases: %s", len(results), rules.describe())
    return rules
