"""Small builders shared by the preprocessing tests: a valid Plans for a synthetic dataset, without the planner."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.contracts.plans import (
    ArchitectureSpec,
    Configuration,
    IntensityStats,
    Plans,
    Resampling,
    save_plans,
)
from autoseg.dataset.synthetic import LABELS, SyntheticSpec, generate

DATASET = "Dataset901_Synth"


def make_configuration(
    name: str = "3d_fullres",
    dims: int = 3,
    target_spacing: tuple[float, ...] = (2.5, 0.8, 0.8),
    normalization: tuple[str, ...] = ("zscore",),
    use_mask_for_norm: tuple[bool, ...] | None = None,
    data_identifier: str | None = None,
    resampling: Resampling | None = None,
) -> Configuration:
    patch = [16, 16] if dims == 2 else [8, 16, 16]
    return Configuration(
        name=name,
        data_identifier=data_identifier or name,
        dims=dims,
        target_spacing=list(target_spacing),
        patch_size=patch,
        batch_size=2,
        median_shape=[float(p) for p in patch],
        normalization=list(normalization),
        use_mask_for_norm=list(use_mask_for_norm or [False] * len(normalization)),
        resampling=resampling or Resampling(),
        architecture=ArchitectureSpec(
            name="unet",
            patch_size=patch,
            strides=[[1] * dims, [2] * dims],
            kernel_sizes=[[3] * dims, [3] * dims],
            features=[4, 8],
        ),
    )


def make_plans(
    configurations: list[Configuration],
    channel_names: dict[str, str] | None = None,
    file_ending: str = ".nii.gz",
    intensity_stats: dict[str, IntensityStats] | None = None,
) -> Plans:
    channel_names = channel_names or {"0": "MRI"}
    stats = intensity_stats or {
        c: IntensityStats(mean=0.0, std=1.0, median=0.0, min=-1.0, max=1.0, percentile_00_5=-1.0, percentile_99_5=1.0)
        for c in channel_names
    }
    return Plans(
        dataset_name=DATASET,
        channel_names=channel_names,
        labels=dict(LABELS),
        file_ending=file_ending,
        configurations={c.name: c for c in configurations},
        default_configurations=[c.name for c in configurations],
        intensity_stats=stats,
        median_spacing=[2.5, 0.8, 0.8],
        median_shape=[24.0, 48.0, 48.0],
    )


def make_dataset(root: Path, spec: SyntheticSpec, plans: Plans) -> Path:
    """Write raw/<DATASET> from ``spec`` and preprocessed/<DATASET>/plans.json; returns the raw folder."""
    raw = generate(root / "raw" / DATASET, spec)
    save_plans(plans, root / "preprocessed" / DATASET / "plans.json")
    return raw


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    total = x.sum() + y.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(x, y).sum() / total)
