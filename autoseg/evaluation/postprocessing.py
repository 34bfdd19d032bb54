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

Connectivity is full (8 neighbours in 2D, 26 in 3D): diagonal contact joins components, so a rule removes
only objects that are truly separate.

``postprocessing.json`` (schema version 1) lives in the results folder of the model it belongs to, where
``autoseg predict`` finds it with :func:`load_postprocessing` and applies it with :func:`apply_postprocessing`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cc3d
import numpy as np

from autoseg.dataset.labels import LabelScheme
from autoseg.errors import ConfigurationError
from autoseg.evaluation.parallel import run_all
from autoseg.fileio import read_json, write_json
from autoseg.io import read_segmentation

log = logging.getLogger(__name__)

POSTPROCESSING_FILE = "postprocessing.json"
POSTPROCESSING_SCHEMA_VERSION = 1


@dataclass
class PostprocessingRules:
    """What to apply to a predicted label map, and the cross-validation evidence for it.

    ``foreground_largest_component``: keep only the largest component of all foreground labels together.
    ``largest_component_labels``: then keep only the largest component of each of these labels.
    ``dice_before`` / ``dice_after``: mean Dice per label (str keys) over ``num_cases`` without / with the rules.
    ``regions`` / ``regions_class_order``: region datasets only, the label values of each region key and the
    paint order; labels are then region keys (module docstring).
    """

    foreground_largest_component: bool = False
    largest_component_labels: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    dice_before: dict[str, float] = field(default_factory=dict)
    dice_after: dict[str, float] = field(default_factory=dict)
    num_cases: int = 0
    regions: dict[str, list[int]] = field(default_factory=dict)
    regions_class_order: list[int] | None = None

    def region_scheme(self) -> LabelScheme | None:
        """The regions as a LabelScheme (names are the keys), None for plain labels."""
        if not self.regions:
            return None
        labels: dict[str, Any] = {"background": 0, **{key: list(values) for key, values in
                                                      sorted(self.regions.items(), key=lambda kv: int(kv[0]))}}
        return LabelScheme.from_labels(labels, self.regions_class_order)

    @property
    def changes_anything(self) -> bool:
        return self.foreground_largest_component or bool(self.largest_component_labels)

    def describe(self) -> str:
        """One line for people: what the rules do."""
        parts = []
        if self.foreground_largest_component:
            parts.append("largest component of all foreground")
        if self.largest_component_labels:
            parts.append("largest component of label(s) " + ", ".join(str(v) for v in self.largest_component_labels))
        return "keep " + "; then ".join(parts) if parts else "none (no rule improved cross-validation Dice)"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": POSTPROCESSING_SCHEMA_VERSION,
            "foreground_largest_component": self.foreground_largest_component,
            "largest_component_labels": [int(v) for v in self.largest_component_labels],
            "labels": [int(v) for v in self.labels],
            "dice_before": dict(self.dice_before),
            "dice_after": dict(self.dice_after),
            "num_cases": self.num_cases,
            "regions": {k: [int(x) for x in v] for k, v in self.regions.items()},
            "regions_class_order": None if self.regions_class_order is None else [int(v) for v in self.regions_class_order],
        }

    @classmethod
    def from_json(cls, data: Any, source: str = POSTPROCESSING_FILE) -> "PostprocessingRules":
        if not isinstance(data, dict) or data.get("schema_version") != POSTPROCESSING_SCHEMA_VERSION:
            found = data.get("schema_version") if isinstance(data, dict) else type(data).__name__
            raise ConfigurationError(
                f"{source}: expected postprocessing rules with schema_version {POSTPROCESSING_SCHEMA_VERSION}, "
                f"found {found}; rerun `autoseg find-best` to regenerate it or delete the file"
            )
        try:
            return cls(
                foreground_largest_component=bool(data["foreground_largest_component"]),
                largest_component_labels=[int(v) for v in data["largest_component_labels"]],
                labels=[int(v) for v in data.get("labels", [])],
                dice_before={str(k): float(v) for k, v in data.get("dice_before", {}).items()},
                dice_after={str(k): float(v) for k, v in data.get("dice_after", {}).items()},
                num_cases=int(data.get("num_cases", 0)),
                regions={str(k): [int(x) for x in v] for k, v in (data.get("regions") or {}).items()},
                regions_class_order=(None if data.get("regions_class_order") is None
                                     else [int(v) for v in data["regions_class_order"]]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"{source}: malformed postprocessing rules ({exc!r}); rerun `autoseg find-best` or delete the file"
            ) from exc


# ----------------------------------------------------------------------------------------------- numerics
def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask ``[(Z,) Y, X]`` of the largest fully-connected component of ``mask`` (empty stays empty;
    of equally large components the one cc3d numbers first is kept)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    if mask.ndim == 2:
        labelled = cc3d.connected_components(mask, connectivity=8)
    elif mask.ndim == 3:
        labelled = cc3d.connected_components(mask, connectivity=26)
    else:
        raise ValueError(f"largest_component needs a 2D or 3D mask, got {mask.ndim}D")
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def _keep_largest(seg: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``seg`` with the voxels of ``mask`` outside its largest component set to background."""
    keep = largest_component(mask)
    out = seg.copy()
    out[mask & ~keep] = 0
    return out


def _keep_largest_region(seg: np.ndarray, key: int, scheme: LabelScheme) -> np.ndarray:
    """``seg`` with region ``key`` (1-based) cut to its largest component: the removed voxels are repainted
    from the remaining region masks (``scheme.paint``), every other voxel is unchanged."""
    mask = np.isin(seg, scheme.regions[key - 1][1])
    removed = mask & ~largest_component(mask)
    out = seg.copy()
    if removed.any():
        masks = scheme.to_region_masks(seg)
        masks[key - 1] &= ~removed
        out[removed] = scheme.paint(masks, dtype=seg.dtype)[removed]
    return out


def apply_postprocessing(seg: np.ndarray, rules: PostprocessingRules | None) -> np.ndarray:
    """Apply ``rules`` to a label map ``[(Z,) Y, X]``; returns a new array of the same shape and dtype.
    Region rules (``rules.regions``) act on region masks and repaint (module docstring)."""
    seg = np.asarray(seg)
    if rules is None or not rules.changes_anything:
        return seg.copy()
    out = seg
    if rules.foreground_largest_component:
        out = _keep_largest(out, out != 0)
    scheme = rules.region_scheme()
    for label in rules.largest_component_labels:
        out = _keep_largest(out, out == label) if scheme is None else _keep_largest_region(out, label, scheme)
    return out if out is not seg else seg.copy()


def _dice_all(reference: np.ndarray, prediction: np.ndarray) -> float:
    from autoseg.evaluation.metrics import confusion_counts, dice_from_counts

    return dice_from_counts(*confusion_counts(reference, prediction)[:3])


def candidate_dice(
    reference: np.ndarray, prediction: np.ndarray, labels: Sequence[int], scheme: LabelScheme | None = None
) -> dict[str, dict[int, float]]:
    """Dice per label of one case under every candidate rule set.

    Returns ``{"none", "foreground", "label", "foreground+label": {label: Dice}}``: unchanged; all-foreground
    largest component; largest component of that label alone; both. Removing voxels of label c only changes
    label c's Dice, so per-label rules can be decided independently of each other. ``scheme`` with regions:
    ``labels`` are region keys ``1..R``, scored on region masks, the rule applied as
    :func:`apply_postprocessing` applies it. A scheme with an ignore label: predicted voxels where the
    reference is ignore are left out of every Dice (as evaluation leaves them out).
    """
    foreground = _keep_largest(prediction, prediction != 0)
    if scheme is not None and scheme.ignore_value is not None:
        annotated = reference != scheme.ignore_value

        def dice(reference_mask: np.ndarray, prediction_mask: np.ndarray) -> float:
            return _dice_all(reference_mask, prediction_mask & annotated)
    else:
        dice = _dice_all
    result: dict[str, dict[int, float]] = {"none": {}, "foreground": {}, "label": {}, "foreground+label": {}}
    if scheme is not None and scheme.has_regions:
        for key in labels:
            values = scheme.regions[key - 1][1]
            reference_mask = np.isin(reference, values)
            result["none"][key] = dice(reference_mask, np.isin(prediction, values))
            result["foreground"][key] = dice(reference_mask, np.isin(foreground, values))
            result["label"][key] = dice(reference_mask, np.isin(_keep_largest_region(prediction, key, scheme), values))
            result["foreground+label"][key] = dice(
                reference_mask, np.isin(_keep_largest_region(foreground, key, scheme), values))
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
        rules.regions = {str(key): list(label_scheme.regions[key - 1][1]) for key in range(1, len(label_scheme.regions) + 1)}
        rules.regions_class_order = list(label_scheme.regions_class_order or [])
    log.info("postprocessing decided on %d cases: %s", len(results), rules.describe())
    return rules


# ----------------------------------------------------------------------------------------------- files
def _rules_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path / POSTPROCESSING_FILE


def save_postprocessing(path: str | os.PathLike, rules: PostprocessingRules) -> Path:
    """Write ``rules`` atomically to ``path`` (a folder gets ``postprocessing.json`` inside); returns the file."""
    target = _rules_path(path)
    write_json(target, rules.to_json())
    return target


def load_postprocessing(folder: str | os.PathLike) -> PostprocessingRules | None:
    """The rules in ``<folder>/postprocessing.json`` (or the given .json file); None when there is none."""
    path = _rules_path(folder)
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except ValueError as exc:
        raise ConfigurationError(f"{path}: not valid JSON ({exc}); rerun `autoseg find-best` or delete the file") from exc
    return PostprocessingRules.from_json(data, str(path))
