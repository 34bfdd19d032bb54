"""``dataset.json`` as a validated dataclass (the nnU-Net v2 raw format)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.errors import DatasetError
from autoseg.io import SUPPORTED_ENDINGS

DATASET_JSON = "dataset.json"


@dataclass(frozen=True)
class DatasetSpec:
    """What ``dataset.json`` declares.

    ``channel_names`` maps channel index -> name ("CT", "T1", "R", ...); the name chooses normalisation.
    ``labels`` maps label name -> integer value, background 0.
    """

    channel_names: dict[int, str]
    labels: dict[str, int]
    num_training: int
    file_ending: str
    name: str = ""
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> list[int]:
        return sorted(self.labels.values())

    @property
    def foreground_labels(self) -> list[int]:
        return [v for v in self.label_values if v != 0]

    @property
    def num_classes(self) -> int:
        """Network output channels: background plus every foreground label."""
        return len(self.labels)

    def label_name(self, value: int) -> str:
        for name, v in self.labels.items():
            if v == value:
                return name
        return str(value)

    def to_json(self) -> dict[str, Any]:
        data = dict(self.extra)
        data.update(
            {
                "channel_names": {str(k): v for k, v in sorted(self.channel_names.items())},
                "labels": dict(sorted(self.labels.items(), key=lambda kv: kv[1])),
                "numTraining": self.num_training,
                "file_ending": self.file_ending,
            }
        )
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

    raw_labels = data["labels"]
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise DatasetError(f"{source}: 'labels' must be a non-empty object like {{\"background\": 0, \"organ\": 1}}")
    labels: dict[str, int] = {}
    for name, value in raw_labels.items():
        if isinstance(value, (list, tuple)):
            raise DatasetError(
                f"{source}: label '{name}' is a region (list of values); region-based training is not "
                "supported yet: declare one integer per label"
            )
        if isinstance(value, bool) or not isinstance(value, int):
            raise DatasetError(f"{source}: label '{name}' must be an integer, found {value!r}")
        labels[str(name)] = value
    if str(next(iter(labels))) == "ignore" or "ignore" in labels:
        raise DatasetError(
            f"{source}: an 'ignore' label is declared; ignore labels are not supported yet: remove it and "
            "relabel those voxels as background or a class"
        )
    if "regions_class_order" in data:
        raise DatasetError(f"{source}: 'regions_class_order' (region-based training) is not supported yet")
    values = sorted(labels.values())
    if 0 not in values:
        raise DatasetError(f"{source}: 'labels' must contain background with value 0, found values {values}")
    if values != list(range(len(values))):
        raise DatasetError(f"{source}: label values must be consecutive 0..{len(values) - 1}, found {values}")
    if len(set(values)) != len(values):
        raise DatasetError(f"{source}: two labels share a value: {labels}")

    ending = data["file_ending"]
    if not isinstance(ending, str) or ending.lower() not in SUPPORTED_ENDINGS:
        raise DatasetError(
            f"{source}: 'file_ending' {ending!r} is not supported; use one of {', '.join(SUPPORTED_ENDINGS)}"
        )
    num_training = data.get("numTraining", 0)
    if isinstance(num_training, bool) or not isinstance(num_training, int) or num_training < 0:
        raise DatasetError(f"{source}: 'numTraining' must be a non-negative integer, found {num_training!r}")

    known = {"channel_names", "labels", "numTraining", "file_ending", "name", "description"}
    extra = {k: v for k, v in data.items() if k not in known}
    return DatasetSpec(
        channel_names=channel_names,
        labels=labels,
        num_training=num_training,
        file_ending=ending.lower(),
        name=str(data.get("name", "")),
        description=str(data.get("description", "")),
        extra=extra,
    )


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
