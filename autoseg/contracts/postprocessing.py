"""postprocessing.json and its application to a label map (the contract between evaluation and inference).

``autoseg find-best`` decides the rules on cross-validation predictions (``autoseg.evaluation.postprocessing``)
and saves them beside the model; ``autoseg predict``, the Predictor, ``autoseg ensemble`` and the bundle load
them with :func:`load_postprocessing` and apply them with :func:`apply_postprocessing`, without importing
evaluation.

Connectivity is full (8 neighbours in 2D, 26 in 3D): diagonal contact joins components, so a rule removes
only objects that are truly separate. Removed voxels become background (0).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cc3d
import numpy as np

from autoseg.dataset.labels import LabelScheme
from autoseg.errors import ConfigurationError
from autoseg.fileio import read_json, write_json

POSTPROCESSING_FILE = "postprocessing.json"
POSTPROCESSING_SCHEMA_VERSION = 1


@dataclass
class PostprocessingRules:
    """What to apply to a predicted label map, and the cross-validation evidence for it.

    ``foreground_largest_component``: keep only the largest component of all foreground labels together.
    ``largest_component_labels``: then keep only the largest component of each of these labels.
    ``dice_before`` / ``dice_after``: mean Dice per label (str keys) over ``num_cases`` without / with the rules.
    ``regions`` / ``regions_class_order``: region datasets only, the label values of each region key and the
    paint order; labels are then region keys ``1..R`` (a rule on region r cuts r's mask to its largest
    component and repaints only the removed voxels from the remaining region masks, in regions_class_order).
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


def keep_largest_component(seg: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``seg`` with the voxels of ``mask`` outside its largest component set to background."""
    keep = largest_component(mask)
    out = seg.copy()
    out[mask & ~keep] = 0
    return out


def keep_largest_region(seg: np.ndarray, key: int, scheme: LabelScheme) -> np.ndarray:
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
    Region rules (``rules.regions``) act on region masks and repaint (:func:`keep_largest_region`)."""
    seg = np.asarray(seg)
    if rules is None or not rules.changes_anything:
        return seg.copy()
    out = seg
    if rules.foreground_largest_component:
        out = keep_largest_component(out, out != 0)
    scheme = rules.region_scheme()
    for label in rules.largest_component_labels:
        out = keep_largest_component(out, out == label) if scheme is None else keep_largest_region(out, label, scheme)
    return out if out is not seg else seg.copy()


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
