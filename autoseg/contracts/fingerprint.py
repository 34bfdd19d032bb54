"""fingerprint.json: what planning measured about a raw dataset, as dataclasses (the contract).

Written by planning (``autoseg.planning.fingerprint.extract_fingerprint`` measures it); read by the planner
and by preprocessing (which sizes its worker pool by the median case). Shapes and spacings are in array axis
order ``(Z, Y, X)`` for 3D images and ``(Y, X)`` for 2D images.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.contracts.plans import IntensityStats
from autoseg.errors import DatasetError
from autoseg.fileio import read_json, write_json

FINGERPRINT_SCHEMA_VERSION = 1
FINGERPRINT_FILE = "fingerprint.json"
SAMPLES_PER_CASE = 10_000  # design.md section 2; the default recorded here, why: autoseg.planning.fingerprint


@dataclass
class CaseFingerprint:
    """One case. ``intensity_stats`` per channel index (as string) over *all* foreground voxels of the case;
    ``label_voxels`` per label value (as string): voxel counts in the original grid."""

    case_id: str
    spacing: list[float]
    shape_before_crop: list[int]
    shape_after_crop: list[int]
    relative_size_after_crop: float  # voxels after crop / voxels before crop
    intensity_stats: dict[str, IntensityStats]
    label_voxels: dict[str, int]


@dataclass
class Fingerprint:
    """The whole dataset (written as ``fingerprint.json``). Per-axis lists are in array axis order."""

    dataset_name: str
    channel_names: dict[str, str]
    labels: dict[str, int | list[int]]  # dataset.json's labels (lists: regions)
    file_ending: str
    cases: list[CaseFingerprint]
    intensity_stats: dict[str, IntensityStats]  # per channel, over the pooled foreground samples
    median_spacing: list[float]
    spacing_percentile_10: list[float]
    spacing_percentile_90: list[float]
    median_shape_after_crop: list[float]
    median_relative_size_after_crop: float
    label_volume_median_mm3: dict[str, float]  # per label value: median over cases of the volume in mm^3
    samples_per_case: int = SAMPLES_PER_CASE
    # region datasets: dataset.json's regions_class_order and its label key order (this file is written with
    # sorted keys, and the key order is the region order); optional, so older fingerprints still load
    regions_class_order: list[int] | None = None
    label_order: list[str] | None = None
    schema_version: int = FINGERPRINT_SCHEMA_VERSION

    @property
    def num_cases(self) -> int:
        return len(self.cases)

    @property
    def dims(self) -> int:
        """Image dimensionality: 2 for 2D images (PNG, 2D NIfTI), 3 for volumes."""
        return len(self.cases[0].spacing)

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    @property
    def spacings(self) -> np.ndarray:
        """``[num_cases, dims]`` float64, mm."""
        return np.array([c.spacing for c in self.cases], dtype=np.float64)

    @property
    def shapes_after_crop(self) -> np.ndarray:
        """``[num_cases, dims]`` float64, voxels."""
        return np.array([c.shape_after_crop for c in self.cases], dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Fingerprint":
        if data.get("schema_version") != FINGERPRINT_SCHEMA_VERSION:
            raise DatasetError(
                f"fingerprint schema version {data.get('schema_version')!r} is not {FINGERPRINT_SCHEMA_VERSION}; "
                "re-run `autoseg plan`"
            )
        fields = dict(data)
        fields["cases"] = [
            CaseFingerprint(**{**c, "intensity_stats": {k: IntensityStats(**v) for k, v in c["intensity_stats"].items()}})
            for c in data["cases"]
        ]
        fields["intensity_stats"] = {k: IntensityStats(**v) for k, v in data["intensity_stats"].items()}
        return cls(**fields)


def save_fingerprint(fingerprint: Fingerprint, path: str | os.PathLike) -> None:
    write_json(path, fingerprint.to_json())


def load_fingerprint(path: str | os.PathLike) -> Fingerprint:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no fingerprint found; run `autoseg plan {path.parent.name}` first")
    try:
        return Fingerprint.from_json(read_json(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: not a valid autoseg fingerprint ({exc}); re-run `autoseg plan`") from exc
