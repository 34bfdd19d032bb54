"""Training augmentation: batchgenerators transforms with the nnU-Net method's probabilities.

Numbers from shared/reference/nnunet.md ("Augmentation", probabilities per sample): rotation p 0.2
(3D +-30 degrees per axis; 2D and "dummy 2D" +-180 degrees in-plane), scaling p 0.2 in [0.7, 1.4], Gaussian
noise p 0.1 (variance up to 0.1), Gaussian blur p 0.2 (sigma 0.5-1, per channel 0.5), brightness
multiplication p 0.15 in [0.75, 1.25], contrast p 0.15 in [0.75, 1.25], low-resolution simulation p 0.25
(zoom 0.5-1, per channel 0.5), gamma p 0.1 inverted and p 0.3 plain in [0.7, 1.5] keeping mean/std,
mirroring p 0.5 per axis.

"Dummy 2D": for anisotropic 3D patches (largest patch edge / first edge > 3) the first axis is folded into
the channels, the spatial transform runs in-plane in 2D, then the axis is unfolded again; the low-resolution
simulation then leaves the first axis alone.

Every transform takes and returns the dict ``{"data": [B, C, *S], "seg": [B, 1, *S], ...}``; the last ones
rename ``seg`` to ``target`` as a list of deep-supervision targets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from autoseg.training.data import deep_supervision_targets

ANISOTROPY_FOR_DUMMY_2D = 3.0  # nnU-Net: max patch edge / first edge > 3 -> in-plane augmentation only
ROTATION_3D = math.radians(30)
ROTATION_2D = math.pi


@dataclass(frozen=True)
class AugmentationSettings:
    """Which spatial augmentation a configuration gets (decided by :func:`augmentation_settings`)."""

    dims: int  # network dims (2 or 3)
    dummy_2d: bool
    rotation: tuple[float, ...]  # max angle per rotation axis, radians (1 entry in 2D / dummy 2D, 3 in 3D)
    mirror_axes: tuple[int, ...]  # spatial axes to mirror


def augmentation_settings(patch_size: Sequence[int]) -> AugmentationSettings:
    """Rotation range, dummy-2D and mirror axes for a network patch (array axis order)."""
    dims = len(patch_size)
    if dims == 2:
        return AugmentationSettings(2, False, (ROTATION_2D,), (0, 1))
    dummy = max(patch_size) / patch_size[0] > ANISOTROPY_FOR_DUMMY_2D
    if dummy:
        return AugmentationSettings(3, True, (ROTATION_2D,), (0, 1, 2))
    return AugmentationSettings(3, False, (ROTATION_3D,) * 3, (0, 1, 2))


def sample_size_for(patch_size: Sequence[int], settings: AugmentationSettings) -> tuple[int, ...]:
    """Size to read from the store so the spatial augmentation can crop ``patch_size`` from it."""
    from autoseg.training.data import enlarged_patch_size

    if settings.dummy_2d:
        return (int(patch_size[0]), *enlarged_patch_size(patch_size[1:], settings.rotation))
    return enlarged_patch_size(patch_size, settings.rotation)


class FoldFirstAxisIntoChannels(AbstractTransform):
    """``[B, C, Z, Y, X]`` -> ``[B, C*Z, Y, X]`` for in-plane ("dummy 2D") spatial augmentation."""

    def __call__(self, **batch: Any) -> dict[str, Any]:
        for key in ("data", "seg"):
            array = batch[key]
            batch[f"_{key}_shape"] = array.shape
            batch[key] = array.reshape(array.shape[0], array.shape[1] * array.shape[2], *array.shape[3:])
        return batch


class UnfoldFirstAxis(AbstractTransform):
    """Inverse of :class:`FoldFirstAxisIntoChannels` (in-plane size may have changed by the crop)."""

    def __call__(self, **batch: Any) -> dict[str, Any]:
        for key in ("data", "seg"):
            b, c, z = batch.pop(f"_{key}_shape")[:3]
            array = batch[key]
            batch[key] = array.reshape(b, c, z, *array.shape[2:])
        return batch


class LabelsToTargets(AbstractTransform):
    """Final step: integer labels (``seg``, float after interpolation) -> ``target``, a list of
    deep-supervision targets ``int16 [B, 1, *S_i]``, highest resolution first."""

    def __init__(self, scales: Sequence[Sequence[float]] | None) -> None:
        self.scales = [tuple(s) for s in scales] if scales else None

    def __call__(self, **batch: Any) -> dict[str, Any]:
        seg = np.rint(batch.pop("seg")).astype(np.int16)
        np.maximum(seg, 0, out=seg)  # border fill of the spatial transform is -1 -> background
        batch["target"] = deep_supervision_targets(seg, self.scales) if self.scales else [seg]
        batch["data"] = np.ascontiguousarray(batch["data"], dtype=np.float32)
        return batch


def training_transforms(
    patch_size: Sequence[int],
    settings: AugmentationSettings,
    ds_scales: Sequence[Sequence[float]] | None,
    intensity: bool = True,
    spatial_probability: float = 0.2,
) -> Compose:
    """The training pipeline: spatial (rotation, scaling, centre crop to ``patch_size``), intensity
    (noise, blur, brightness, contrast, low resolution, gamma), mirroring, deep-supervision targets.

    ``intensity=False`` and ``spatial_probability`` exist for tests (alignment checks with p = 1).
    """
    transforms: list[AbstractTransform] = []
    spatial_patch = tuple(patch_size[1:]) if settings.dummy_2d else tuple(patch_size)
    if settings.dummy_2d:
        transforms.append(FoldFirstAxisIntoChannels())
    angles = settings.rotation
    angle_x = (-angles[0], angles[0])
    angle_y = (-angles[1], angles[1]) if len(angles) > 1 else (0.0, 0.0)
    angle_z = (-angles[2], angles[2]) if len(angles) > 2 else (0.0, 0.0)
    transforms.append(
        SpatialTransform(
            spatial_patch,
            patch_center_dist_from_border=None,
            do_elastic_deform=False,
            do_rotation=True,
            angle_x=angle_x,
            angle_y=angle_y,
            angle_z=angle_z,
            p_rot_per_axis=1,
            do_scale=True,
            scale=(0.7, 1.4),
            border_mode_data="constant",
            border_cval_data=0,
            order_data=3,
            border_mode_seg="constant",
            border_cval_seg=-1,
            order_seg=1,
            random_crop=False,  # centre crop of the enlarged sample: the sampler already chose the location
            p_el_per_sample=0,
            p_scale_per_sample=spatial_probability,
            p_rot_per_sample=spatial_probability,
            independent_scale_for_each_axis=False,
        )
    )
    if settings.dummy_2d:
        transforms.append(UnfoldFirstAxis())
    if intensity:
        transforms += [
            GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_sample=0.1),
            GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2, p_per_channel=0.5),
            BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.15),
            ContrastAugmentationTransform(contrast_range=(0.75, 1.25), p_per_sample=0.15),
            SimulateLowResolutionTransform(
                zoom_range=(0.5, 1.0), per_channel=True, p_per_channel=0.5, order_downsample=0, order_upsample=3,
                p_per_sample=0.25, ignore_axes=(0,) if settings.dummy_2d else None,
            ),
            GammaTransform((0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True, p_per_sample=0.1),
            GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.3),
        ]
    if settings.mirror_axes:
        transforms.append(MirrorTransform(settings.mirror_axes))
    transforms.append(LabelsToTargets(ds_scales))
    return Compose(transforms)


class CentreCrop(AbstractTransform):
    """Centre-crop ``data`` and ``seg`` to ``patch_size`` (validation batches sampled at the enlarged size)."""

    def __init__(self, patch_size: Sequence[int]) -> None:
        self.patch_size = tuple(patch_size)

    def __call__(self, **batch: Any) -> dict[str, Any]:
        for key in ("data", "seg"):
            array = batch[key]
            starts = [(n - p) // 2 for n, p in zip(array.shape[2:], self.patch_size)]
            index = tuple(slice(s, s + p) for s, p in zip(starts, self.patch_size))
            batch[key] = array[(slice(None), slice(None)) + index]
        return batch


def validation_transforms(ds_scales: Sequence[Sequence[float]] | None) -> Compose:
    """Validation batches: no augmentation, only deep-supervision targets."""
    return Compose([LabelsToTargets(ds_scales)])
