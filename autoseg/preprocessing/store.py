"""The preprocessed store: one folder per data identifier, per case an image array, a label array and a
JSON of properties. Arrays are plain ``.npy`` so the training loader memory-maps them and reads one patch
without loading the volume. No pickle anywhere: ``np.load(..., allow_pickle=False)`` and JSON.

    preprocessed/<dataset>/<data_identifier>/<case>.npy        float32 [C, Z, Y, X]
    preprocessed/<dataset>/<data_identifier>/<case>_seg.npy    int8    [1, Z, Y, X]  (training cases only)
    preprocessed/<dataset>/<data_identifier>/<case>.json       CaseProperties

Stored arrays are always 4D: 2D images get a leading Z axis of size 1, so one loader serves every
configuration (2D configurations sample single slices). The JSON is written last: a case is complete
exactly when its JSON exists and the arrays it names load with the shapes it records.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.errors import PreprocessingError
from autoseg.fileio import atomic_path, atomic_write, read_json
from autoseg.io import Geometry

PROPERTIES_SCHEMA_VERSION = 1


@dataclass
class CaseProperties:
    """Everything needed to map a preprocessed case back onto its original image grid.

    Shapes, spacings and the crop box are in the stored (4D minus channel) axis order ``Z, Y, X``, which is
    the raw order transposed by ``transpose_forward`` (``geometry`` alone stays in the raw order); for 2D
    images the leading axis has size 1 and spacing ``original_spacing[0]`` is a placeholder.
    """

    case_id: str
    geometry: Geometry  # of the original image file (2D or 3D)
    original_spacing: list[float]  # 3 entries, Z first
    shape_before_crop: list[int]  # 3 entries
    bbox: list[list[int]]  # crop box [[start, stop] per axis] in the original (3-entry) grid
    shape_after_crop: list[int]
    spacing_after_resampling: list[float]
    shape_after_resampling: list[int]
    # raw array axes in the working order above (Plans.transpose_forward as applied); None: identity
    transpose_forward: list[int] | None = None
    class_locations: dict[str, list[list[int]]] = field(default_factory=dict)  # label -> [[z, y, x], ...]
    schema_version: int = PROPERTIES_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        # shallow on purpose: every field is already JSON-able, and dataclasses.asdict would deep-copy the
        # tens of thousands of class-location triples one by one (most of a small case's preprocessing time)
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["geometry"] = self.geometry.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CaseProperties":
        if data.get("schema_version") != PROPERTIES_SCHEMA_VERSION:
            raise PreprocessingError(
                f"case properties schema {data.get('schema_version')!r} is not {PROPERTIES_SCHEMA_VERSION}; "
                "re-run `autoseg preprocess`"
            )
        fields = dict(data)
        fields["geometry"] = Geometry.from_json(data["geometry"])
        return cls(**fields)


def image_path(folder: Path, case_id: str) -> Path:
    return folder / f"{case_id}.npy"


def label_path(folder: Path, case_id: str) -> Path:
    return folder / f"{case_id}_seg.npy"


def properties_path(folder: Path, case_id: str) -> Path:
    return folder / f"{case_id}.json"


def properties_text(properties: CaseProperties) -> str:
    """The case JSON: one top-level key per line (sorted), each value compact on its line.

    Deterministic like ``autoseg.fileio.write_json`` and still readable, but without its indented layout,
    which puts every coordinate of the ~10,000 class locations per class on a line of its own and can only
    use Python's slow JSON encoder (the C encoder serves compact output only).
    """
    data = properties.to_json()
    lines = [f"  {json.dumps(key)}: {json.dumps(data[key], sort_keys=True)}" for key in sorted(data)]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)


def save_case(
    folder: str | os.PathLike,
    data: np.ndarray,
    label: np.ndarray | None,
    properties: CaseProperties,
) -> None:
    """Store one case atomically: arrays first, properties JSON last (its presence marks completion)."""
    folder = Path(folder)
    if data.ndim != 4:
        raise ValueError(f"stored images are [C, Z, Y, X]; got shape {data.shape}")
    properties_path(folder, properties.case_id).unlink(missing_ok=True)
    _save_npy(image_path(folder, properties.case_id), np.ascontiguousarray(data, dtype=np.float32))
    if label is not None:
        if label.shape[1:] != data.shape[1:] or label.shape[0] != 1:
            raise ValueError(f"label shape {label.shape} does not match image {data.shape}")
        _save_npy(label_path(folder, properties.case_id), np.ascontiguousarray(label, dtype=np.int8))
    text = properties_text(properties)
    atomic_write(properties_path(folder, properties.case_id), lambda handle: handle.write(text.encode("utf-8")))


def load_properties(folder: str | os.PathLike, case_id: str) -> CaseProperties:
    path = properties_path(Path(folder), case_id)
    if not path.is_file():
        raise PreprocessingError(f"{path}: missing; run `autoseg preprocess` (or `autoseg plan`) for this dataset")
    return CaseProperties.from_json(read_json(path))


def load_case(
    folder: str | os.PathLike, case_id: str, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """``(image [C,Z,Y,X], label [1,Z,Y,X] or None, properties)``; arrays memory-mapped read-only by default."""
    folder = Path(folder)
    properties = load_properties(folder, case_id)
    mode = "r" if mmap else None
    try:
        data = np.load(image_path(folder, case_id), mmap_mode=mode, allow_pickle=False)
        label_file = label_path(folder, case_id)
        label = np.load(label_file, mmap_mode=mode, allow_pickle=False) if label_file.is_file() else None
    except (OSError, ValueError) as exc:
        raise PreprocessingError(
            f"{image_path(folder, case_id)}: preprocessed arrays are unreadable ({exc}); "
            "re-run `autoseg preprocess`, which redoes incomplete cases"
        ) from exc
    return data, label, properties


def is_complete(folder: str | os.PathLike, case_id: str, with_label: bool = True) -> bool:
    """True when the case's JSON exists and its arrays load with the recorded shape (a rerun skips it)."""
    folder = Path(folder)
    try:
        data, label, properties = load_case(folder, case_id, mmap=True)
    except Exception:  # any unreadable piece means: redo this case
        return False
    if list(data.shape[1:]) != list(properties.shape_after_resampling):
        return False
    if with_label and (label is None or label.shape[1:] != data.shape[1:]):
        return False
    return True


def list_stored_cases(folder: str | os.PathLike) -> list[str]:
    """Case identifiers with a properties JSON in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if not p.name.startswith("."))
