"""Intensity normalisation per channel, one pure function per scheme of ``autoseg.contracts.plans``.

Every function takes one channel (any spatial shape), returns a new float32 array of the same shape and
never modifies its input. Schemes follow the reference method (reference/nnunet.md "Normalisation"):

- ``ct``: clip to the dataset's foreground [p0.5, p99.5], subtract the foreground mean, divide by its std
  (global statistics from the fingerprint, so Hounsfield units keep their meaning across cases);
- ``zscore``: the image's own mean/std, computed inside the nonzero mask when the plan asks for it
  (then voxels outside the mask are set to 0);
- ``rescale_0_1``: min-max to [0, 1]; ``rgb_0_1``: divide by 255; ``none``: unchanged.
"""
from __future__ import annotations

import numpy as np

from autoseg.contracts.plans import (
    NORM_CT,
    NORM_NONE,
    NORM_RESCALE,
    NORM_RGB,
    NORM_ZSCORE,
    IntensityStats,
)
from autoseg.errors import ConfigurationError

# Guards a division by a zero std or range (a constant image); the reference uses the same 1e-8.
EPSILON = 1e-8


def normalize_ct(image: np.ndarray, stats: IntensityStats) -> np.ndarray:
    """Clip to ``[stats.percentile_00_5, stats.percentile_99_5]``, then ``(x - stats.mean) / stats.std``."""
    clipped = np.clip(image.astype(np.float32), stats.percentile_00_5, stats.percentile_99_5)
    return ((clipped - np.float32(stats.mean)) / np.float32(max(stats.std, EPSILON))).astype(np.float32)


def normalize_zscore(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``(x - mean) / std`` of this image; with a bool ``mask`` (same shape) the statistics come from the
    masked voxels only and voxels outside the mask become 0."""
    data = image.astype(np.float32)
    if mask is None:
        mean, std = float(data.mean(dtype=np.float64)), float(data.std(dtype=np.float64))
        return ((data - np.float32(mean)) / np.float32(max(std, EPSILON))).astype(np.float32)
    if mask.shape != data.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {data.shape}")
    inside = data[mask]
    if inside.size == 0:
        return np.zeros_like(data)
    mean, std = float(inside.mean(dtype=np.float64)), float(inside.std(dtype=np.float64))
    out = np.zeros_like(data)
    out[mask] = (inside - np.float32(mean)) / np.float32(max(std, EPSILON))
    return out


def normalize_rescale(image: np.ndarray) -> np.ndarray:
    """Min-max rescale to [0, 1] (a constant image becomes 0)."""
    data = image.astype(np.float32)
    low, high = float(data.min()), float(data.max())
    return ((data - np.float32(low)) / np.float32(max(high - low, EPSILON))).astype(np.float32)


def normalize_rgb(image: np.ndarray) -> np.ndarray:
    """8-bit colour values divided by 255 (0..255 -> 0..1)."""
    return (image.astype(np.float32) / np.float32(255.0)).astype(np.float32)


def normalize_none(image: np.ndarray) -> np.ndarray:
    """Unchanged values as a float32 copy."""
    return np.array(image, dtype=np.float32, copy=True)


def normalize_channel(
    image: np.ndarray,
    scheme: str,
    mask: np.ndarray | None = None,
    stats: IntensityStats | None = None,
) -> np.ndarray:
    """Apply ``scheme`` (one of ``plans.NORMALIZATION_SCHEMES``) to one channel.

    ``mask`` is used by ``zscore`` only (pass None for whole-image statistics); ``stats`` is required by ``ct``.
    """
    if scheme == NORM_CT:
        if stats is None:
            raise ConfigurationError(
                "plans.json: CT normalisation needs the channel's intensity_stats but none were found; "
                "re-run `autoseg plan`"
            )
        return normalize_ct(image, stats)
    if scheme == NORM_ZSCORE:
        return normalize_zscore(image, mask)
    if scheme == NORM_RESCALE:
        return normalize_rescale(image)
    if scheme == NORM_RGB:
        return normalize_rgb(image)
    if scheme == NORM_NONE:
        return normalize_none(image)
    raise ConfigurationError(
        f"plans.json: unknown normalisation scheme {scheme!r}; expected one of "
        f"{', '.join((NORM_CT, NORM_ZSCORE, NORM_NONE, NORM_RESCALE, NORM_RGB))}; fix the plan or re-run `autoseg plan`"
    )
