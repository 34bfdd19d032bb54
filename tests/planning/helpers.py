"""Crafted fingerprints for rule tests: no images needed."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from autoseg.contracts.fingerprint import CaseFingerprint, Fingerprint
from autoseg.contracts.plans import IntensityStats

STATS = IntensityStats(mean=100.0, std=20.0, median=100.0, min=0.0, max=200.0, percentile_00_5=50.0,
                       percentile_99_5=150.0)


def crafted_fingerprint(
    spacings: Sequence[Sequence[float]],
    shapes: Sequence[Sequence[int]],
    channel_names: dict[str, str] | None = None,
    file_ending: str = ".nii.gz",
    relative_size: float = 1.0,
    num_labels: int = 3,
) -> Fingerprint:
    channel_names = channel_names or {"0": "MRI"}
    cases = [
        CaseFingerprint(
            case_id=f"case_{i:03d}", spacing=[float(s) for s in sp], shape_before_crop=[int(n) for n in sh],
            shape_after_crop=[int(n) for n in sh], relative_size_after_crop=relative_size,
            intensity_stats={c: STATS for c in channel_names}, label_voxels={"0": 1, "1": 1},
        )
        for i, (sp, sh) in enumerate(zip(spacings, shapes))
    ]
    sp = np.array(spacings, dtype=float)
    return Fingerprint(
        dataset_name="Dataset999_Crafted",
        channel_names=dict(channel_names),
        labels={f"l{v}" if v else "background": v for v in range(num_labels)},
        file_ending=file_ending,
        cases=cases,
        intensity_stats={c: STATS for c in channel_names},
        median_spacing=np.median(sp, axis=0).tolist(),
        spacing_percentile_10=np.percentile(sp, 10, axis=0).tolist(),
        spacing_percentile_90=np.percentile(sp, 90, axis=0).tolist(),
        median_shape_after_crop=np.median(np.array(shapes, float), axis=0).tolist(),
        median_relative_size_after_crop=relative_size,
        label_volume_median_mm3={"0": 1.0},
    )


def uniform(n: int, spacing: Sequence[float], shape: Sequence[int], jitter: float = 0.05) -> tuple[list, list]:
    """``n`` cases around ``spacing``/``shape`` with a deterministic spread of +-``jitter``."""
    factors = np.linspace(1 - jitter, 1 + jitter, n)
    spacings = [[s * f for s in spacing] for f in factors]
    shapes = [[int(round(d * (2 - f))) for d in shape] for f in factors]
    return spacings, shapes
