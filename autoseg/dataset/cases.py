"""Listing a raw dataset's cases: which files make up each case."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from autoseg.dataset.spec import DatasetSpec

IMAGES_TRAIN = "imagesTr"
LABELS_TRAIN = "labelsTr"
IMAGES_TEST = "imagesTs"

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One case: its identifier, its channel files in channel order, and its label file (None at test time)."""

    case_id: str
    image_files: tuple[Path, ...]
    label_file: Path | None


def _strip_ending(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.lower().endswith(ending.lower()) else None


def group_channel_files(folder: str | os.PathLike, ending: str) -> dict[str, dict[int, Path]]:
    """``{case_id: {channel: path}}`` for every ``<case>_<CCCC><ending>`` file in ``folder``."""
    groups: dict[str, dict[int, Path]] = {}
    folder = Path(folder)
    if not folder.is_dir():
        return groups
    for path in sorted(folder.iterdir()):
        stem = _strip_ending(path.name, ending)
        if stem is None or path.name.startswith("."):
            continue
        match = _CHANNEL_SUFFIX.match(stem)
        if match:
            groups.setdefault(match.group("case"), {})[int(match.group("channel"))] = path
    return groups


def list_training_cases(dataset_dir: str | os.PathLike, spec: DatasetSpec) -> list[Case]:
    """Cases that have a label file, with whatever channel files exist (verify checks completeness)."""
    dataset_dir = Path(dataset_dir)
    images = group_channel_files(dataset_dir / IMAGES_TRAIN, spec.file_ending)
    cases = []
    for label in sorted((dataset_dir / LABELS_TRAIN).glob(f"*{spec.file_ending}")):
        case_id = _strip_ending(label.name, spec.file_ending)
        if case_id is None or label.name.startswith("."):
            continue
        channels = images.get(case_id, {})
        files = tuple(channels[c] for c in sorted(channels))
        cases.append(Case(case_id, files, label))
    return cases


def list_image_cases(folder: str | os.PathLike, ending: str) -> list[Case]:
    """Cases (without labels) in a folder of ``<case>_<CCCC><ending>`` files, e.g. imagesTs/ or a user's input."""
    groups = group_channel_files(folder, ending)
    return [Case(cid, tuple(ch[c] for c in sorted(ch)), None) for cid, ch in sorted(groups.items())]
