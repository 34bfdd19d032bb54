"""Training augmentation: the nnU-Net method's transforms and probabilities (batchgenerators' intensity and
mirror transforms; rotation/scaling and low-resolution simulation with torch, :class:`RotateScaleCrop` and
:class:`SimulateLowResolution`).

Numbers from the nnU-Net method (its augmentation, probabilities per sample): rotation p 0.2
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

import cc3d
import numpy as np
import torch
import torch.nn.functional as F
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform
from scipy.ndimage import distance_transform_edt

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


def centre_crop(shape: Sequence[int], patch_size: Sequence[int]) -> tuple[slice, ...]:
    """Slices of the centred ``patch_size`` region of a ``shape`` (lower side gets the odd voxel)."""
    return tuple(slice((n - p) // 2, (n - p) // 2 + p) for n, p in zip(shape, patch_size))


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """Rotation in array-axis order: one angle (2D, in-plane) or three (3D: about axes 0, 1 and 2, in turn)."""
    if len(angles) == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        plane = [a for a in range(3) if a != axis]
        rotation = np.eye(3)
        rotation[np.ix_(plane, plane)] = [[c, -s], [s, c]]
        matrix = rotation @ matrix
    return matrix


def _draw_scale(scale_range: tuple[float, float]) -> float:
    # batchgenerators' rule: half of the draws zoom in (factor < 1), half zoom out, so the mean zoom stays ~1
    low, high = scale_range
    if np.random.random() < 0.5 and low < 1:
        return float(np.random.uniform(low, 1))
    return float(np.random.uniform(max(low, 1), high))


class RotateScaleCrop(AbstractTransform):
    """Rotation and scaling about the sample's centre, then the centre crop to ``patch_size``, with torch's
    ``grid_sample``: (bi/tri)linear for the image, linear on one-hot labels then argmax for the segmentation.

    Same parameters and draws as batchgenerators' ``SpatialTransform`` with ``random_crop=False`` (rotation and
    scaling each with ``p`` per sample, one angle per rotation axis, isotropic scale), but much cheaper per
    batch: that transform's scipy ``map_coordinates`` (cubic spline prefilter for the image, one pass per label
    for the segmentation) was 84 % of our loader's time (benchmarks/results/training.md). Linear image
    interpolation is also what the reference method's current augmentation uses. Samples that are neither
    rotated nor scaled are only cropped; the others go through one ``grid_sample`` call together, image and
    foreground labels as channels of one input (the sampling cost is mostly per point, not per channel).
    Points that fall outside the sample get image 0 and count as background, as the padding of the sample
    does. Random numbers come from numpy's global generator, like the other batchgenerators transforms, so a
    seeded in-process loader stays reproducible.
    """

    def __init__(self, patch_size: Sequence[int], rotation: Sequence[float], p_rotation: float,
                 scale: tuple[float, float], p_scale: float) -> None:
        self.patch_size = tuple(int(p) for p in patch_size)
        self.rotation = tuple(float(a) for a in rotation)  # max angle per rotation axis (1 in 2D, 3 in 3D)
        self.p_rotation, self.scale, self.p_scale = p_rotation, scale, p_scale
        self._base: list[torch.Tensor] | None = None

    def _draw_matrix(self) -> np.ndarray | None:
        rotate = np.random.uniform() < self.p_rotation
        scale = np.random.uniform() < self.p_scale
        if not (rotate or scale):
            return None
        matrix = np.eye(len(self.patch_size))
        if rotate:
            matrix = rotation_matrix([np.random.uniform(-a, a) for a in self.rotation])
        if scale:
            matrix = matrix * _draw_scale(self.scale)
        return matrix

    def _axes(self) -> list[torch.Tensor]:
        """Normalised patch coordinate along each array axis, -1 and 1 at the first and last voxel centre,
        shaped to broadcast over the patch (built once per transform)."""
        if self._base is None:
            dims = len(self.patch_size)
            self._base = [
                (torch.linspace(-1.0, 1.0, n) if n > 1 else torch.zeros(1)).reshape(
                    [n if a == axis else 1 for a in range(dims)])
                for axis, n in enumerate(self.patch_size)
            ]
        return self._base

    def _grid(self, matrix: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
        """grid_sample's grid ``[1, *patch, dims]`` for "input position = sample centre + matrix @ (offset from
        the patch centre)". In normalised coordinates (align_corners=True) that map is linear with no shift; the
        grid's last axis runs x, y(, z), the reverse of our array axes. Built from the separable per-axis
        coordinates by broadcasting: torch's ``affine_grid`` (a matmul over every patch point) cost as much as
        sampling one channel."""
        half_input = (np.asarray(shape, dtype=np.float64) - 1) / 2
        half_patch = (np.asarray(self.patch_size, dtype=np.float64) - 1) / 2
        linear = (matrix * half_patch[None, :]) / np.maximum(half_input, 0.5)[:, None]
        axes = self._axes()
        components = []
        for row in linear[::-1]:  # input axes in grid order: last array axis first
            component = axes[0] * float(row[0])
            for axis in range(1, len(axes)):
                component = component + axes[axis] * float(row[axis])
            components.append(component)
        return torch.stack(components, dim=-1)[None]

    def __call__(self, **batch: Any) -> dict[str, Any]:
        data, seg = batch["data"], batch["seg"]
        spatial = data.shape[2:]
        crop = (slice(None), slice(None)) + centre_crop(spatial, self.patch_size)
        data_out = np.array(data[crop], dtype=np.float32)
        seg_out = np.array(seg[crop], dtype=np.float32)
        matrices = [self._draw_matrix() for _ in range(data.shape[0])]
        chosen = [b for b, matrix in enumerate(matrices) if matrix is not None]
        if chosen:
            grid = torch.cat([self._grid(matrices[b], spatial) for b in chosen])
            data_out[chosen], seg_out[chosen] = self._resample(data[chosen], seg[chosen], grid)
        batch["data"], batch["seg"] = data_out, seg_out
        return batch

    def _resample(self, data: np.ndarray, seg: np.ndarray, grid: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image and labels of the chosen samples on ``grid``. Labels: one channel per foreground label (and
        per folded slice in "dummy 2D"); background's weight is what the foreground leaves, 1 - sum, so the
        padding outside the sample counts as background without a channel of its own."""
        samples, image_channels, seg_channels = data.shape[0], data.shape[1], seg.shape[1]
        top = int(seg.max()) if seg.size else 0
        stack = np.empty((samples, image_channels + top * seg_channels, *data.shape[2:]), dtype=np.float32)
        stack[:, :image_channels] = data
        for label in range(1, top + 1):
            first = image_channels + (label - 1) * seg_channels
            np.equal(seg, label, out=stack[:, first:first + seg_channels])
        sampled = F.grid_sample(torch.from_numpy(stack), grid, mode="bilinear", padding_mode="zeros",
                                align_corners=True)
        image = sampled[:, :image_channels].numpy()
        weights = sampled[:, image_channels:].reshape(samples, top, seg_channels, *self.patch_size)
        result = torch.zeros((samples, seg_channels, *self.patch_size))
        if top:
            # argmax as a running maximum (torch's argmax along a leading axis is ~10x slower here); strict >
            # so ties go to the lower label
            best = 1.0 - weights.sum(dim=1)
            for label in range(1, top + 1):
                higher = weights[:, label - 1] > best
                best = torch.where(higher, weights[:, label - 1], best)
                result[higher] = float(label)
        return image, result.numpy()


class SimulateLowResolution(AbstractTransform):
    """Per sample with ``p_per_sample``, per channel with ``p_per_channel``: shrink by a zoom drawn from
    ``zoom_range`` (nearest neighbour), then scale back up (linear), with torch's ``interpolate``.

    The reference method's low-resolution simulation with the same draws as batchgenerators'
    ``SimulateLowResolutionTransform`` (per-channel zoom, ``ignore_axes`` kept at full size), whose scipy cubic
    upsampling was the largest cost left in a batch after :class:`RotateScaleCrop` (~6 of 22 ms).
    """

    def __init__(self, zoom_range: tuple[float, float], p_per_sample: float, p_per_channel: float,
                 ignore_axes: Sequence[int] = ()) -> None:
        self.zoom_range, self.p_per_sample, self.p_per_channel = zoom_range, p_per_sample, p_per_channel
        self.ignore_axes = tuple(ignore_axes)

    def __call__(self, **batch: Any) -> dict[str, Any]:
        data = batch["data"]
        spatial = data.shape[2:]
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        for b in range(data.shape[0]):
            if np.random.uniform() >= self.p_per_sample:
                continue
            for c in range(data.shape[1]):
                if np.random.uniform() >= self.p_per_channel:
                    continue
                zoom = np.random.uniform(*self.zoom_range)
                small = [n if axis in self.ignore_axes else max(1, round(n * zoom)) for axis, n in enumerate(spatial)]
                channel = torch.from_numpy(np.ascontiguousarray(data[b, c], dtype=np.float32))[None, None]
                shrunk = F.interpolate(channel, size=small, mode="nearest")
                data[b, c] = F.interpolate(shrunk, size=list(spatial), mode=mode, align_corners=False)[0, 0].numpy()
        return batch


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


class PreviousStageToData(AbstractTransform):
    """Cascade: ``seg`` channel 1 (the previous stage's segmentation, moved by the spatial augmentation and
    mirroring together with the label) -> one channel per foreground class appended to ``data``, as
    ``autoseg.inference.predictor.foreground_one_hot`` builds them at prediction time; ``seg`` keeps the label."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)

    def __call__(self, **batch: Any) -> dict[str, Any]:
        seg = batch["seg"]
        previous = np.rint(seg[:, 1:2])
        classes = np.arange(1, self.num_classes, dtype=np.float32).reshape(1, -1, *([1] * (seg.ndim - 2)))
        one_hot = (previous == classes).astype(np.float32)
        batch["data"] = np.concatenate([np.asarray(batch["data"], dtype=np.float32), one_hot], axis=1)
        batch["seg"] = seg[:, :1]
        return batch


class RandomBinaryOperators(AbstractTransform):
    """Cascade: per sample with ``p_per_sample``, each previous-stage channel (in random order) gets a
    dilation, erosion, opening or closing with a ball of radius drawn from ``radius`` voxels, so the network
    learns to correct the previous stage instead of copying its boundaries. Voxels a channel gains are taken
    from the others, so the channels stay a one-hot encoding. Reference numbers: p 0.4, radius 1-8.

    Dilation/erosion by a ball are thresholds of the Euclidean distance transform (scipy): one pass whatever
    the radius, where a morphological pass with a radius-8 ball costs 17^3 neighbours per voxel; and only over
    the object's bounding box grown by radius + 1 (nothing farther away can change the result), which for
    the usual small objects is a fraction of the patch."""

    OPERATIONS = ("dilation", "erosion", "opening", "closing")

    def __init__(self, channels: Sequence[int], p_per_sample: float = 0.4, radius: tuple[int, int] = (1, 8)) -> None:
        self.channels = list(channels)
        self.p_per_sample, self.radius = p_per_sample, radius

    @staticmethod
    def _near(mask: np.ndarray, radius: int) -> tuple[slice, ...] | None:
        """The mask's bounding box grown by ``radius + 1`` (clipped to the array); None for an empty mask."""
        found = np.nonzero(mask)
        if not found[0].size:
            return None
        return tuple(slice(max(0, int(i.min()) - radius - 1), min(n, int(i.max()) + radius + 2))
                     for i, n in zip(found, mask.shape))

    @classmethod
    def _dilate(cls, mask: np.ndarray, radius: int) -> np.ndarray:
        box, out = cls._near(mask, radius), np.zeros_like(mask)
        if box is not None:
            region = mask[box]
            out[box] = True if region.all() else distance_transform_edt(~region) <= radius
        return out

    @classmethod
    def _erode(cls, mask: np.ndarray, radius: int) -> np.ndarray:
        box, out = cls._near(mask, radius), np.zeros_like(mask)
        if box is not None:
            region = mask[box]
            # a region without background (the object fills it up to the array edge) has nothing to erode from
            out[box] = True if region.all() else distance_transform_edt(region) > radius
        return out

    def apply(self, mask: np.ndarray, operation: str, radius: int) -> np.ndarray:
        """One operation on a boolean mask (exposed for tests)."""
        if operation == "dilation":
            return self._dilate(mask, radius)
        if operation == "erosion":
            return self._erode(mask, radius)
        if operation == "opening":
            return self._dilate(self._erode(mask, radius), radius)
        return self._erode(self._dilate(mask, radius), radius)

    def __call__(self, **batch: Any) -> dict[str, Any]:
        data = batch["data"]
        for b in range(data.shape[0]):
            if np.random.uniform() >= self.p_per_sample:
                continue
            for channel in np.random.permutation(self.channels):
                operation = self.OPERATIONS[np.random.randint(len(self.OPERATIONS))]
                radius = int(np.random.randint(self.radius[0], self.radius[1] + 1))
                before = data[b, channel] > 0.5
                after = self.apply(before, operation, radius)
                gained = after & ~before
                for other in self.channels:
                    if other != channel:
                        data[b, other][gained] = 0
                data[b, channel] = after
        return batch


class RemoveRandomComponent(AbstractTransform):
    """Cascade: per sample with ``p_per_sample``, each previous-stage channel loses one connected component
    drawn at random among those smaller than ``max_fraction`` of the patch (it becomes background), so the
    network does not rely on the previous stage finding every object. Reference numbers: p 0.2, 15 %."""

    def __init__(self, channels: Sequence[int], p_per_sample: float = 0.2, max_fraction: float = 0.15) -> None:
        self.channels = list(channels)
        self.p_per_sample, self.max_fraction = p_per_sample, max_fraction

    def __call__(self, **batch: Any) -> dict[str, Any]:
        data = batch["data"]
        for b in range(data.shape[0]):
            if np.random.uniform() >= self.p_per_sample:
                continue
            for channel in self.channels:
                mask = np.ascontiguousarray(data[b, channel] > 0.5)
                if not mask.any():
                    continue
                components = cc3d.connected_components(mask.astype(np.uint8))
                sizes = np.bincount(components.ravel())[1:]
                small = np.flatnonzero(sizes < self.max_fraction * mask.size) + 1
                if small.size:
                    data[b, channel][components == small[np.random.randint(small.size)]] = 0
        return batch


class LabelsToTargets(AbstractTransform):
    """Final step: integer labels (``seg``, float after interpolation) -> ``target``, a list of
    deep-supervision targets ``int16 [B, 1, *S_i]``, highest resolution first."""

    def __init__(self, scales: Sequence[Sequence[float]] | None) -> None:
        self.scales = [tuple(s) for s in scales] if scales else None

    def __call__(self, **batch: Any) -> dict[str, Any]:
        seg = np.rint(batch.pop("seg")).astype(np.int16)
        batch["target"] = deep_supervision_targets(seg, self.scales) if self.scales else [seg]
        batch["data"] = np.ascontiguousarray(batch["data"], dtype=np.float32)
        return batch


def training_transforms(
    patch_size: Sequence[int],
    settings: AugmentationSettings,
    ds_scales: Sequence[Sequence[float]] | None,
    intensity: bool = True,
    spatial_probability: float = 0.2,
    cascade_classes: int = 0,
) -> Compose:
    """The training pipeline: spatial (rotation, scaling, centre crop to ``patch_size``), intensity
    (noise, blur, brightness, contrast, low resolution, gamma), mirroring, deep-supervision targets.

    ``cascade_classes``: the number of classes when ``seg`` carries a cascade's previous-stage segmentation in
    channel 1; it then becomes one-hot input channels, perturbed by :class:`RandomBinaryOperators` and
    :class:`RemoveRandomComponent`. ``intensity=False`` and ``spatial_probability`` exist for tests
    (alignment checks with p = 1).
    """
    transforms: list[AbstractTransform] = []
    spatial_patch = tuple(patch_size[1:]) if settings.dummy_2d else tuple(patch_size)
    if settings.dummy_2d:
        transforms.append(FoldFirstAxisIntoChannels())
    transforms.append(RotateScaleCrop(spatial_patch, settings.rotation, p_rotation=spatial_probability,
                                      scale=(0.7, 1.4), p_scale=spatial_probability))
    if settings.dummy_2d:
        transforms.append(UnfoldFirstAxis())
    if intensity:
        transforms += [
            GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_sample=0.1),
            GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2, p_per_channel=0.5),
            BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.15),
            ContrastAugmentationTransform(contrast_range=(0.75, 1.25), p_per_sample=0.15),
            SimulateLowResolution((0.5, 1.0), p_per_sample=0.25, p_per_channel=0.5,
                                  ignore_axes=(0,) if settings.dummy_2d else ()),
            GammaTransform((0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True, p_per_sample=0.1),
            GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.3),
        ]
    if settings.mirror_axes:
        transforms.append(MirrorTransform(settings.mirror_axes))
    if cascade_classes:
        transforms.append(PreviousStageToData(cascade_classes))
        if intensity:
            # the one-hot channels sit after the image channels: index them from the end
            channels = list(range(-(cascade_classes - 1), 0))
            transforms += [RandomBinaryOperators(channels), RemoveRandomComponent(channels)]
    transforms.append(LabelsToTargets(ds_scales))
    return Compose(transforms)


class CentreCrop(AbstractTransform):
    """Centre-crop ``data`` and ``seg`` to ``patch_size`` (validation batches sampled at the enlarged size)."""

    def __init__(self, patch_size: Sequence[int]) -> None:
        self.patch_size = tuple(patch_size)

    def __call__(self, **batch: Any) -> dict[str, Any]:
        for key in ("data", "seg"):
            array = batch[key]
            batch[key] = array[(slice(None), slice(None)) + centre_crop(array.shape[2:], self.patch_size)]
        return batch


def validation_transforms(ds_scales: Sequence[Sequence[float]] | None, cascade_classes: int = 0) -> Compose:
    """Validation batches: no augmentation, only the cascade's one-hot inputs and deep-supervision targets."""
    transforms: list[AbstractTransform] = [PreviousStageToData(cascade_classes)] if cascade_classes else []
    return Compose(transforms + [LabelsToTargets(ds_scales)])
