"""U-Net topology from spacing and patch: how often each axis is downsampled, kernel sizes, features.

The rules (nnU-Net v2's network topology rules):

- Halve the feature map repeatedly. An axis is downsampled in a stage while its current size is at least
  2 x ``MIN_FEATURE_MAP_EDGE`` and its current spacing is less than 2x the smallest current spacing among
  the axes still large enough; when only one axis remains it needs 3 x ``MIN_FEATURE_MAP_EDGE``.
- The kernel of an axis is 1 until its current spacing comes within 2x of the finest current spacing, then
  3 for good (so thick slices are not convolved across before they are comparable); the bottleneck is 3.
- The patch is padded up to a multiple of 2^(downsamplings per axis).
- Features: 32 in the first stage, doubling per stage, capped at 320 (3D) / 512 (2D).

All per-axis values are in array axis order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

MIN_FEATURE_MAP_EDGE = 4  # nnunet.md: smallest bottleneck edge
BASE_FEATURES = 32  # nnunet.md: features of the first stage
MAX_FEATURES = {2: 512, 3: 320}  # nnunet.md: caps in 2D / 3D
SPACING_RATIO_LIMIT = 2.0  # nnunet.md: "within a factor 2 of the smallest"


@dataclass(frozen=True)
class Topology:
    """One stage per entry: ``strides[0]`` is all ones; ``divisor`` = per-axis product of the strides."""

    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    features: tuple[int, ...]
    patch_size: tuple[int, ...]  # the requested patch padded to a multiple of ``divisor``

    @property
    def divisor(self) -> tuple[int, ...]:
        return tuple(math.prod(stage[a] for stage in self.strides) for a in range(len(self.patch_size)))

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    def pooling_per_axis(self) -> tuple[int, ...]:
        """How many times each axis is downsampled."""
        return tuple(sum(1 for stage in self.strides if stage[a] > 1) for a in range(len(self.patch_size)))


def features_per_stage(num_stages: int, dims: int, base: int = BASE_FEATURES, cap: int | None = None) -> list[int]:
    """``base * 2^s`` per stage, capped at ``MAX_FEATURES[dims]`` (or ``cap``)."""
    limit = MAX_FEATURES[dims] if cap is None else cap
    return [min(base * 2**s, limit) for s in range(num_stages)]


def plan_topology(
    spacing: Sequence[float],
    patch_size: Sequence[float],
    min_edge: int = MIN_FEATURE_MAP_EDGE,
    max_features: int | None = None,
) -> Topology:
    """The U-Net topology for a (possibly fractional, e.g. a median shape) ``patch_size`` at ``spacing`` (mm).

    Returns strides, kernel sizes and features per stage and the patch padded up to the divisor.
    """
    dims = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(p) for p in patch_size]
    kernel = [1] * dims
    strides: list[tuple[int, ...]] = [(1,) * dims]
    kernels: list[tuple[int, ...]] = []
    while True:
        large_enough = [a for a in range(dims) if current_size[a] >= 2 * min_edge]
        if not large_enough:
            break
        finest = min(current_spacing[a] for a in large_enough)
        poolable = [a for a in large_enough if current_spacing[a] / finest < SPACING_RATIO_LIMIT]
        if len(poolable) == 1 and current_size[poolable[0]] < 3 * min_edge:
            break
        if not poolable:
            break
        finest_all = min(current_spacing)
        for a in range(dims):
            if kernel[a] != 3 and current_spacing[a] / finest_all < SPACING_RATIO_LIMIT:
                kernel[a] = 3
        kernels.append(tuple(kernel))
        stride = [1] * dims
        for a in poolable:
            stride[a] = 2
            current_spacing[a] *= 2
            # a stride-2 convolution with "same" padding maps n voxels to ceil(n / 2)
            current_size[a] = math.ceil(current_size[a] / 2)
        strides.append(tuple(stride))
    kernels.append((3,) * dims)  # bottleneck
    divisor = [math.prod(stage[a] for stage in strides) for a in range(dims)]
    padded = tuple(int(math.ceil(p / d - 1e-9)) * d for p, d in zip(patch_size, divisor))
    features = features_per_stage(len(strides), dims, cap=max_features)
    return Topology(tuple(strides), tuple(kernels), tuple(features), padded)
