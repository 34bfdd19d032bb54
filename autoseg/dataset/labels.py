"""What a dataset's label values mean: plain classes, nested regions, and the ``ignore`` label.

dataset.json (nnU-Net v2 format) declares ``labels`` as name -> value. Three kinds follow from it:

- **Plain classes**: every value an integer, background 0, consecutive. The network has one softmax output
  per class (background included); evaluation is per foreground class.
- **Regions**: some value is a list of integers (``"whole tumour": [1, 2, 3]``, ``"tumour core": [2, 3]``,
  ``"enhancing tumour": 3``; an integer is then the one-value region). Every label except background (0)
  and ``ignore`` is a region, in dataset.json key order, and ``regions_class_order`` says, per region, which
  label value is painted where that region is predicted; later regions overwrite earlier ones. The network
  has one sigmoid output per region; reference and prediction are both turned into region masks before
  they are compared. Label files still hold integers: the union of the region values.
- **Ignore**: a label named exactly ``ignore`` whose value is the highest of all plus one. Its voxels are
  unannotated: no loss, left out of every metric, never drawn as foreground. The network never outputs it
  (predictions are dense), so it counts in no output.

:class:`LabelScheme` holds one such declaration; everything here is a small pure numpy function. Arrays are
label maps ``[*S]`` (any spatial shape ``S``: ``[Z, Y, X]`` or ``[Y, X]``, integer) and per-output stacks
``[R, *S]``. A scheme is built by ``autoseg.dataset.spec.parse_dataset_spec`` (which turns every invalid form
into a DatasetError naming dataset.json) and travels in plans.json as ``labels`` + ``regions_class_order`` +
``label_order`` (the key order: JSON files here are written with sorted keys, and region order matters).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

IGNORE_NAME = "ignore"
BACKGROUND_VALUE = 0

# How the network's outputs become probabilities (one per output channel).
SOFTMAX = "softmax"
SIGMOID = "sigmoid"


def _as_value(value: int | Sequence[int]) -> int | tuple[int, ...]:
    """A label's value as stored in the scheme: an int, or a tuple of ints for a list in dataset.json."""
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return int(value)


@dataclass(frozen=True)
class LabelScheme:
    """The labels of one dataset (see the module docstring).

    ``labels``: ``(name, value)`` pairs in dataset.json key order; a value is an int or a tuple of ints (a
    region written as a list). ``regions_class_order``: one label value per region, or None for plain
    classes. Build it with :meth:`from_labels` (or :meth:`from_json`); validity is checked by
    ``parse_dataset_spec``, not here.
    """

    labels: tuple[tuple[str, int | tuple[int, ...]], ...]
    regions_class_order: tuple[int, ...] | None = None

    @classmethod
    def from_labels(
        cls,
        labels: Mapping[str, int | Sequence[int]],
        regions_class_order: Sequence[int] | None = None,
        label_order: Sequence[str] | None = None,
    ) -> "LabelScheme":
        """From dataset.json's ``labels`` and ``regions_class_order``. ``label_order``: the key order when
        ``labels`` lost it (read from a file written with sorted keys); default: ``labels``' own order."""
        names = list(labels) if label_order is None else [str(name) for name in label_order]
        if sorted(names) != sorted(labels):
            raise ValueError(f"label_order {names} does not name the labels {list(labels)}")
        order = None if regions_class_order is None else tuple(int(v) for v in regions_class_order)
        return cls(tuple((str(name), _as_value(labels[name])) for name in names), order)

    # ------------------------------------------------------------------------------------------ what it is
    @property
    def has_regions(self) -> bool:
        """True when some label is a list of values (region-based training)."""
        return any(isinstance(value, tuple) for _, value in self.labels)

    @property
    def ignore_value(self) -> int | None:
        """The value of the ``ignore`` label, or None when the dataset has none."""
        for name, value in self.labels:
            if name == IGNORE_NAME and isinstance(value, int):
                return value
        return None

    @property
    def has_ignore(self) -> bool:
        return self.ignore_value is not None

    @property
    def regions(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, values)`` of every region in dataset.json order (every label except background and
        ignore; an integer label is the region of that one value). Empty for plain classes."""
        if not self.has_regions:
            return []
        return [(name, value if isinstance(value, tuple) else (value,)) for name, value in self.labels
                if name != IGNORE_NAME and value != BACKGROUND_VALUE]

    @property
    def classes(self) -> list[tuple[str, int]]:
        """``(name, value)`` of every class the network outputs, by value, background first, ignore
        excluded. Empty for region schemes."""
        if self.has_regions:
            return []
        return sorted(((name, value) for name, value in self.labels if name != IGNORE_NAME),  # type: ignore[misc]
                      key=lambda item: item[1])

    @property
    def label_values(self) -> list[int]:
        """Every integer a label file may hold, sorted: background, each class or region member, ignore."""
        values: set[int] = set()
        for _, value in self.labels:
            values.update(value if isinstance(value, tuple) else (value,))
        return sorted(values)

    @property
    def foreground_values(self) -> list[int]:
        """Label values other than background and ignore (what a label file's objects are made of)."""
        return [v for v in self.label_values if v not in (BACKGROUND_VALUE, self.ignore_value)]

    @property
    def num_outputs(self) -> int:
        """Network output channels: the number of regions (sigmoid), else the number of classes with
        background and without ignore (softmax)."""
        return len(self.regions) if self.has_regions else len(self.classes)

    @property
    def output_activation(self) -> str:
        """``"sigmoid"`` (regions: independent, overlapping outputs) or ``"softmax"`` (exclusive classes)."""
        return SIGMOID if self.has_regions else SOFTMAX

    @property
    def output_names(self) -> list[str]:
        """One name per network output channel, in channel order."""
        return [name for name, _ in self.regions] if self.has_regions else [name for name, _ in self.classes]

    def evaluation_units(self) -> list[tuple[str, tuple[int, ...]]]:
        """What evaluation scores, one ``(name, label values)`` each: every region, or every foreground
        class as a one-value unit. Background and ignore are never units."""
        if self.has_regions:
            return self.regions
        return [(name, (value,)) for name, value in self.classes if value != BACKGROUND_VALUE]

    def label_name(self, value: int) -> str:
        """The name declared for an integer label value (its digits when only regions contain it)."""
        for name, declared in self.labels:
            if declared == value:
                return name
        return str(value)

    # ------------------------------------------------------------------------------------------ numerics
    def to_region_masks(self, segmentation: np.ndarray) -> np.ndarray:
        """Label map ``[*S]`` -> bool ``[R, *S]`` (regions only): mask ``r`` is True where the label is one
        of region ``r``'s values. Ignore voxels are False in every mask (ignore is never part of a region).
        These are the targets of the ``R`` sigmoid outputs and what :meth:`paint` turns back.

        >>> scheme = LabelScheme.from_labels({"background": 0, "whole": [1, 2], "core": 2}, [1, 2])
        >>> scheme.to_region_masks(np.array([0, 1, 2])).astype(int).tolist()
        [[0, 1, 1], [0, 0, 1]]
        """
        if not self.has_regions:
            raise ValueError("to_region_masks needs a region scheme; plain classes compare label values")
        return self.unit_masks(segmentation)

    def unit_masks(self, segmentation: np.ndarray) -> np.ndarray:
        """Label map ``[*S]`` -> bool ``[U, *S]``, one mask per :meth:`evaluation_units` entry (the regions,
        or each foreground class ``label == value``)."""
        segmentation = np.asarray(segmentation)
        units = self.evaluation_units()
        masks = np.zeros((len(units), *segmentation.shape), dtype=bool)
        for index, (_, values) in enumerate(units):
            masks[index] = np.isin(segmentation, values)
        return masks

    def annotated_mask(self, segmentation: np.ndarray) -> np.ndarray:
        """Bool ``[*S]``: False on ignore voxels, True elsewhere (everywhere when there is no ignore)."""
        segmentation = np.asarray(segmentation)
        if self.ignore_value is None:
            return np.ones(segmentation.shape, dtype=bool)
        return segmentation != self.ignore_value

    def paint(self, outputs: np.ndarray, threshold: float = 0.5, dtype: type = np.uint8) -> np.ndarray:
        """Network outputs ``[num_outputs, *S]`` -> label map ``[*S]`` of ``dtype``.

        Regions: ``outputs`` are region masks (bool) or sigmoid probabilities; where output ``r`` exceeds
        ``threshold`` the value ``regions_class_order[r]`` is painted, regions in order, so later ones
        overwrite earlier ones (a nested region painted last stays visible). Voxels in no region are 0.
        Plain classes: ``outputs`` are per-class scores (softmax probabilities or logits); each voxel gets
        the value of its highest-scoring class (ties: the lower class), ``threshold`` unused.
        """
        outputs = np.asarray(outputs)
        if outputs.shape[0] != self.num_outputs:
            raise ValueError(f"expected {self.num_outputs} output channels, found {outputs.shape[0]}")
        if not self.has_regions:
            values = np.array([value for _, value in self.classes], dtype=dtype)
            return values[np.argmax(outputs, axis=0)]
        assert self.regions_class_order is not None  # parse_dataset_spec requires it with regions
        segmentation = np.zeros(outputs.shape[1:], dtype=dtype)
        for channel, value in enumerate(self.regions_class_order):
            segmentation[outputs[channel] > threshold] = value
        return segmentation

    # ------------------------------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        """``{"labels": [[name, value], ...], "regions_class_order": [...] | None}``: a list of pairs, not
        an object, so that writing with sorted keys cannot reorder the regions."""
        return {
            "labels": [[name, list(value) if isinstance(value, tuple) else value] for name, value in self.labels],
            "regions_class_order": None if self.regions_class_order is None else list(self.regions_class_order),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LabelScheme":
        order = data.get("regions_class_order")
        return cls(tuple((str(name), _as_value(value)) for name, value in data["labels"]),
                   None if order is None else tuple(int(v) for v in order))

    def labels_dict(self) -> dict[str, int | list[int]]:
        """dataset.json's ``labels`` object (key order = region order), lists for regions."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in self.labels}
