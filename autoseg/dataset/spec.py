"""``dataset.json`` as a validated dataclass (the nnU-Net v2 raw format)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.dataset.labels import BACKGROUND_VALUE, IGNORE_NAME, LabelScheme
from autoseg.errors import DatasetError
from autoseg.fileio import atomic_write
from autoseg.io import SUPPORTED_ENDINGS

DATASET_JSON = "dataset.json"


@dataclass(frozen=True)
class DatasetSpec:
    """What ``dataset.json`` declares.

    ``channel_names`` maps channel index -> name ("CT", "T1", "R", ...); the name chooses normalisation.
    ``labels`` maps label name -> integer value (background 0) or, for region-based datasets, a list of
    values; key order is dataset.json's (it orders the regions). ``regions_class_order``: one label value per
    region (regions only). What the labels mean: :attr:`label_scheme` (``autoseg.dataset.labels``).
    """

    channel_names: dict[int, str]
    labels: dict[str, int | list[int]]
    num_training: int
    file_ending: str
    name: str = ""
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    regions_class_order: list[int] | None = None

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_scheme(self) -> LabelScheme:
        return LabelScheme.from_labels(self.labels, self.regions_class_order)

    @property
    def label_values(self) -> list[int]:
        """Every integer a label file may hold (background, classes or region members, ignore), sorted."""
        return self.label_scheme.label_values

    @property
    def foreground_labels(self) -> list[int]:
        """Label values other than background and ignore."""
        return self.label_scheme.foreground_values

    @property
    def num_classes(self) -> int:
        """Network output channels: background plus every foreground label (plain datasets), the number of
        regions (region datasets); an ignore label is never an output."""
        return self.label_scheme.num_outputs

    def label_name(self, value: int) -> str:
        return self.label_scheme.label_name(value)

    def to_json(self) -> dict[str, Any]:
        data = dict(self.extra)
        data.update(
            {
                "channel_names": {str(k): v for k, v in sorted(self.channel_names.items())},
                # regions keep their order (it is their meaning); plain labels are listed by value
                "labels": dict(self.labels) if self.regions_class_order is not None
                else dict(sorted(self.labels.items(), key=lambda kv: kv[1])),
                "numTraining": self.num_training,
                "file_ending": self.file_ending,
            }
        )
        if self.regions_class_order is not None:
            data["regions_class_order"] = list(self.regions_class_order)
        if self.name:
            data["name"] = self.name
        if self.description:
            data["description"] = self.description
        return data


def parse_dataset_spec(data: Any, source: str = DATASET_JSON) -> DatasetSpec:
    """Validate the contents of a dataset.json; every problem becomes a DatasetError naming the key and fix."""
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: expected a JSON object at the top level, found {type(data).__name__}")
    missing = [key for key in ("channel_names", "labels", "file_ending") if key not in data]
    if "channel_names" not in data and "modality" in data:
        raise DatasetError(
            f"{source}: has 'modality' but no 'channel_names': this looks like a Medical Segmentation Decathlon "
            "dataset.json; convert the task with `autoseg convert-msd TASK_DIR`"
        )
    if missing:
        raise DatasetError(f"{source}: missing key(s) {', '.join(missing)}; see dataset_templates/README.md")

    raw_channels = data["channel_names"]
    if not isinstance(raw_channels, dict) or not raw_channels:
        raise DatasetError(f"{source}: 'channel_names' must be a non-empty object like {{\"0\": \"CT\"}}")
    try:
        channel_names = {int(k): str(v) for k, v in raw_channels.items()}
    except ValueError as exc:
        raise DatasetError(f"{source}: 'channel_names' keys must be channel indices \"0\", \"1\", ...") from exc
    if sorted(channel_names) != list(range(len(channel_names))):
        raise DatasetError(
            f"{source}: 'channel_names' keys must be 0..{len(channel_names) - 1} without gaps, "
            f"found {sorted(channel_names)}"
        )

    labels, regions_class_order = parse_labels(data["labels"], data.get("regions_class_order"), source,
                                               "regions_class_order" in data)

    ending = data["file_ending"]
    if not isinstance(ending, str) or ending.lower() not in SUPPORTED_ENDINGS:
        raise DatasetError(
            f"{source}: 'file_ending' {ending!r} is not supported; use one of {', '.join(SUPPORTED_ENDINGS)}"
        )
    num_training = data.get("numTraining", 0)
    if isinstance(num_training, bool) or not isinstance(num_training, int) or num_training < 0:
        raise DatasetError(f"{source}: 'numTraining' must be a non-negative integer, found {num_training!r}")

    known = {"channel_names", "labels", "numTraining", "file_ending", "name", "description", "regions_class_order"}
    extra = {k: v for k, v in data.items() if k not in known}
    return DatasetSpec(
        channel_names=channel_names,
        labels=labels,
        num_training=num_training,
        file_ending=ending.lower(),
        name=str(data.get("name", "")),
        description=str(data.get("description", "")),
        extra=extra,
        regions_class_order=regions_class_order,
    )


def _values_of(value: int | list[int]) -> list[int]:
    return list(value) if isinstance(value, list) else [value]


def parse_labels(
    raw_labels: Any, raw_order: Any, source: str = DATASET_JSON, order_given: bool | None = None
) -> tuple[dict[str, int | list[int]], list[int] | None]:
    """Validate dataset.json's ``labels`` and ``regions_class_order`` (the rules: autoseg.dataset.labels).
    Returns the labels (key order kept, lists for regions) and the order (None without regions); every
    invalid form is a one-line DatasetError naming ``source`` and the fix."""
    order_given = raw_order is not None if order_given is None else order_given
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise DatasetError(f"{source}: 'labels' must be a non-empty object like {{\"background\": 0, \"organ\": 1}}")
    labels: dict[str, int | list[int]] = {}
    for name, value in raw_labels.items():
        name = str(name)
        if isinstance(value, (list, tuple)):
            if name == IGNORE_NAME:
                raise DatasetError(f"{source}: label 'ignore' must be one integer (the highest value plus one), "
                                   f"found the list {list(value)}; write it as a single value")
            if not value or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise DatasetError(f"{source}: region '{name}' must be a non-empty list of integer label values, "
                                   f"found {list(value)!r}")
            repeated = sorted({v for v in value if list(value).count(v) > 1})
            if repeated:
                raise DatasetError(f"{source}: region '{name}' lists value(s) {repeated} more than once "
                                   f"({list(value)}); list each label value once")
            if BACKGROUND_VALUE in value:
                raise DatasetError(f"{source}: region '{name}' contains background 0 ({list(value)}); a region "
                                   "holds foreground values only: remove 0 from it")
            labels[name] = [int(v) for v in value]
        elif isinstance(value, bool) or not isinstance(value, int):
            raise DatasetError(f"{source}: label '{name}' must be an integer or a list of integers (a region), "
                               f"found {value!r}")
        else:
            labels[name] = int(value)
    has_regions = any(isinstance(v, list) for v in labels.values())

    ignore = labels.get(IGNORE_NAME)
    others = {name: value for name, value in labels.items() if name != IGNORE_NAME}
    plain_values = [value for value in others.values() if isinstance(value, int)]
    if len(set(plain_values)) != len(plain_values):
        shared = sorted({v for v in plain_values if plain_values.count(v) > 1})
        raise DatasetError(f"{source}: two labels share the value(s) {shared}: {labels}; give each label its own "
                           "value (a structure made of several values is a region: a list)")
    if BACKGROUND_VALUE not in plain_values:
        raise DatasetError(f"{source}: 'labels' must contain background with value 0, found values "
                           f"{sorted({v for value in others.values() for v in _values_of(value)})}")
    if isinstance(ignore, int):
        for name, value in others.items():
            if isinstance(value, list) and ignore in value:
                raise DatasetError(f"{source}: region '{name}' contains the ignore value {ignore} ({value}); "
                                   f"ignore voxels belong to no region: remove {ignore} from it")
    values = sorted({v for value in others.values() for v in _values_of(value)})
    if values != list(range(len(values))):
        missing = sorted(set(range(max(values) + 1)) - set(values))
        regions = [name for name, value in others.items()
                   if missing and isinstance(value, list) and max(value) > missing[0]]
        if regions:
            raise DatasetError(f"{source}: region '{regions[0]}' lists {others[regions[0]]}, but value(s) "
                               f"{missing} are never declared; label values must be consecutive from 0, found "
                               f"{values}: renumber the label files and the regions")
        raise DatasetError(f"{source}: label values must be consecutive 0..{len(values) - 1}, found {values}")
    if ignore is not None and ignore != values[-1] + 1:
        raise DatasetError(f"{source}: label 'ignore' has value {ignore}; it must be the highest value, "
                           f"{values[-1] + 1} (the highest other value {values[-1]} plus one): renumber the "
                           f"ignore voxels and the label to {values[-1] + 1}")

    regions = [name for name, value in others.items() if value != BACKGROUND_VALUE]
    if not has_regions:
        if order_given:
            raise DatasetError(f"{source}: 'regions_class_order' is given but no label is a region (a list of "
                               "values); remove 'regions_class_order' or declare the regions as lists")
        return labels, None
    if not order_given or raw_order is None:
        raise DatasetError(f"{source}: the labels {', '.join(repr(r) for r in regions)} are regions, so "
                           f"'regions_class_order' is required: add one label value per region in this order, "
                           f"e.g. {[max(_values_of(others[r])) for r in regions]}")
    if not isinstance(raw_order, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in raw_order):
        raise DatasetError(f"{source}: 'regions_class_order' must be a list of integer label values, found "
                           f"{raw_order!r}")
    if len(raw_order) != len(regions):
        raise DatasetError(f"{source}: 'regions_class_order' has {len(raw_order)} entries but there are "
                           f"{len(regions)} regions ({', '.join(regions)}); give exactly one label value per region")
    in_regions = {v for name in regions for v in _values_of(others[name])}
    strays = [v for v in raw_order if v not in in_regions]
    if strays:
        raise DatasetError(f"{source}: 'regions_class_order' names value(s) {strays}, which are in no region "
                           f"(region values: {sorted(in_regions)}); use a value of the region it paints")
    return labels, [int(v) for v in raw_order]


def write_dataset_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write a dataset.json atomically with its keys in the given order, not sorted as ``write_json`` does:
    the order of ``labels`` is the order of the regions of a region-based dataset (its meaning)."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def load_dataset_spec(dataset_dir: str | os.PathLike) -> DatasetSpec:
    """Read and validate ``<dataset_dir>/dataset.json``."""
    path = Path(dataset_dir) / DATASET_JSON
    if not path.is_file():
        raise DatasetError(
            f"{path}: not found; every raw dataset needs a dataset.json (templates in dataset_templates/)"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    return parse_dataset_spec(data, str(path))
