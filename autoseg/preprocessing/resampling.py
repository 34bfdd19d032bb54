"""Resampling to a target spacing and back to a given shape (pure numerics, scipy.ndimage based).

Conventions: volumes are 3D ``[Z, Y, X]`` (2D images carry a dummy Z of size 1), channel-first stacks
``[C, Z, Y, X]``; spacings are in mm in the same axis order. Voxel centres are aligned the way image
resizing does it (``grid_mode=True``: the first and last voxel *edges* coincide), so shape -> new shape ->
shape is the exact geometric inverse.

Rules of the reference method (reference/nnunet.md "Resampling"):
- images: cubic spline (order 3); labels: one-hot, linear (order 1) per class, then the most likely class,
  which keeps structures thinner than a voxel of the new grid that nearest-neighbour would drop;
- anisotropic data (max/min spacing > 3): the coarse axis is resampled on its own with ``order_z``
  (nearest by default), the other axes slice by slice with the normal order, so blurry through-plane
  interpolation does not smear slices together.

Speed and memory: everything runs in float32, one channel (or one class) at a time. scipy's ``zoom``
would build a float64 copy of the whole volume for its spline prefilter; we prefilter in float32 ourselves.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage

# Boundary handling for the spline prefilter and the interpolation: half-sample symmetric extension, the
# natural boundary for grid_mode (voxel-edge aligned) resizing. Must be the same in both calls.
_MODE = "reflect"


def compute_new_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, ...]:
    """Shape covering the same physical extent at ``target_spacing``: ``round(shape * spacing / target)``,
    at least 1 per axis. All three in array order; spacings in mm."""
    if not (len(shape) == len(spacing) == len(target_spacing)):
        raise ValueError(f"shape {tuple(shape)}, spacing {tuple(spacing)} and target {tuple(target_spacing)} differ in length")
    return tuple(
        max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing)
    )


def coarse_axis(spacing: Sequence[float], threshold: float) -> int | None:
    """The single axis whose spacing is > ``threshold`` x the finest spacing, else None (also when two axes
    tie for coarsest: then there is no one out-of-plane axis)."""
    values = np.asarray(spacing, dtype=np.float64)
    if values.max() / values.min() <= threshold:
        return None
    coarsest = np.flatnonzero(np.isclose(values, values.max()))
    return int(coarsest[0]) if coarsest.size == 1 else None


def choose_separate_axis(
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    separate_z: bool | None = None,
    threshold: float = 3.0,
) -> int | None:
    """Which axis to resample on its own, for resampling between ``spacing`` and ``target_spacing``.

    ``separate_z`` True forces the coarsest axis of ``spacing``, False never separates, None decides:
    the original spacing's coarse axis if it is anisotropic, else the target spacing's (the rule of the
    reference). Forward and inverse resampling call this with the same (original, target) pair so both
    directions treat the same axis the same way.
    """
    if separate_z is False:
        return None
    if separate_z is True:
        return int(np.argmax(spacing))
    axis = coarse_axis(spacing, threshold)
    if axis is None:
        axis = coarse_axis(target_spacing, threshold)
    return axis


def _zoom(volume: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """Resize one array (any dims) to ``new_shape`` with a spline of ``order``; float32 in and out."""
    volume = np.asarray(volume, dtype=np.float32)
    new_shape = tuple(int(n) for n in new_shape)
    if volume.shape == new_shape:
        return volume.copy()
    factors = [n / o for n, o in zip(new_shape, volume.shape)]
    source = volume
    if order > 1:
        # float32 prefilter: scipy's own prefilter would materialise the volume as float64.
        source = ndimage.spline_filter(volume, order=order, output=np.float32, mode=_MODE)
    out = ndimage.zoom(source, factors, output=np.float32, order=order, mode=_MODE, prefilter=False, grid_mode=True)
    if out.shape != new_shape:  # scipy rounds shape * factor; guard against a float rounding surprise
        raise AssertionError(f"zoom produced {out.shape}, expected {new_shape}")
    return out


def resample_volume(
    volume: np.ndarray,
    new_shape: Sequence[int],
    order: int,
    separate_axis: int | None = None,
    order_z: int = 0,
) -> np.ndarray:
    """Resample one 3D volume ``[Z, Y, X]`` to ``new_shape`` (float32).

    With ``separate_axis``: every slice across that axis is resized in-plane with ``order``, then the axis
    itself with ``order_z`` (skipped when its length does not change, e.g. 2D configurations).
    """
    new_shape = tuple(int(n) for n in new_shape)
    if volume.ndim != len(new_shape):
        raise ValueError(f"volume has {volume.ndim} axes, new shape {new_shape} has {len(new_shape)}")
    if separate_axis is None:
        return _zoom(volume, new_shape, order)
    moved = np.moveaxis(np.asarray(volume, dtype=np.float32), separate_axis, 0)
    in_plane = tuple(n for axis, n in enumerate(new_shape) if axis != separate_axis)
    slices = np.empty((moved.shape[0], *in_plane), dtype=np.float32)
    for index in range(moved.shape[0]):
        slices[index] = _zoom(moved[index], in_plane, order)
    target_length = new_shape[separate_axis]
    if target_length != moved.shape[0]:
        # 1D resize along the separate axis: flatten the plane so scipy works on a (length, pixels) array
        flat = slices.reshape(slices.shape[0], -1)
        flat = _zoom(flat, (target_length, flat.shape[1]), order_z)
        slices = flat.reshape(target_length, *in_plane)
    return np.ascontiguousarray(np.moveaxis(slices, 0, separate_axis))


def resample_channels(
    data: np.ndarray,
    new_shape: Sequence[int],
    order: int,
    separate_axis: int | None = None,
    order_z: int = 0,
) -> np.ndarray:
    """``[C, Z, Y, X]`` -> float32 ``[C, *new_shape]``, one channel at a time (images, probabilities)."""
    out = np.empty((data.shape[0], *[int(n) for n in new_shape]), dtype=np.float32)
    for channel in range(data.shape[0]):
        out[channel] = resample_volume(data[channel], new_shape, order, separate_axis, order_z)
    return out


# Floor for log(p): float32 softmax underflows to exactly 0 for logit gaps beyond ~87, and log(0) = -inf
# would turn the interpolation into NaN. log(tiny) = -87.3 caps a gap no network output reaches in practice.
_LOG_FLOOR = float(np.finfo(np.float32).tiny)


def resample_probabilities(
    probabilities: np.ndarray,
    new_shape: Sequence[int],
    order: int,
    separate_axis: int | None = None,
    order_z: int = 0,
) -> np.ndarray:
    """Class probabilities ``[K, Z, Y, X]`` (summing to 1 over K) -> float32 ``[K, *new_shape]``, interpolated
    as log-probabilities and renormalised with a softmax.

    Why not the probabilities themselves: softmax saturates at 0 and 1 a voxel or two from a boundary, so
    interpolating probabilities puts each boundary near half-way between the two voxels that straddle it,
    whatever the network said about where it lies. For one network, log p equals its logits up to a per-voxel
    constant; linear interpolation and the softmax carry that constant through unchanged, so this is
    interpolating logits, which keep varying across a boundary and place it between the voxels. For a fold
    ensemble, log of the mean probability plays the logits' part. One-hot input comes out with exactly the
    argmax a probability interpolation gives (log p is then an affine function of p). What it changes on
    real predictions, same weights both ways: docs/benchmarks.md (benchmarks/export_interpolation.py).
    """
    new_shape = tuple(int(n) for n in new_shape)
    if tuple(probabilities.shape[1:]) == new_shape:
        return np.array(probabilities, dtype=np.float32)  # nothing to interpolate: keep the values bit-exact
    out = np.empty((probabilities.shape[0], *new_shape), dtype=np.float32)
    for channel in range(probabilities.shape[0]):
        log_p = np.log(np.maximum(np.asarray(probabilities[channel], dtype=np.float32), _LOG_FLOOR))
        out[channel] = resample_volume(log_p, new_shape, order, separate_axis, order_z)
    # softmax over K in place, shifted by the per-voxel maximum so exp never overflows
    out -= out.max(axis=0, keepdims=True)
    np.exp(out, out=out)
    out /= out.sum(axis=0, keepdims=True)
    return out


def resample_labels(
    label: np.ndarray,
    new_shape: Sequence[int],
    order: int = 1,
    separate_axis: int | None = None,
    order_z: int = 0,
) -> np.ndarray:
    """Resample a label map ``[Z, Y, X]`` (integers, background 0) to ``new_shape`` through its one-hot
    encoding: each present class is resampled as a float32 mask and every voxel takes the class with the
    largest value (ties: the lower label). Same dtype as ``label``.

    Background is never resampled: interpolation of order <= 1 is a convex combination, so the one-hot
    values sum to 1 everywhere and background = 1 - sum(foreground) (one zoom less, usually the biggest).
    Higher orders resample background too. At most four float32 volumes live at a time.
    """
    new_shape = tuple(int(n) for n in new_shape)
    if label.shape == new_shape:
        return label.copy()
    classes = [int(c) for c in np.unique(label)]
    foreground = [c for c in classes if c != 0]
    out = np.zeros(new_shape, dtype=label.dtype)
    if not foreground:
        out[...] = classes[0] if classes else 0
        return out
    linear = order <= 1 and order_z <= 1
    if linear and 0 in classes:
        best_value: np.ndarray | None = None
        total = np.zeros(new_shape, dtype=np.float32)
        candidates = foreground
    else:
        best_value = None
        total = None
        candidates = classes
    for value in candidates:
        resampled = resample_volume((label == value).astype(np.float32), new_shape, order, separate_axis, order_z)
        if total is not None:
            total += resampled
        if best_value is None:
            best_value = resampled
            out[...] = value
        else:
            better = resampled > best_value
            out[better] = value
            np.maximum(best_value, resampled, out=best_value)
    if total is not None:
        assert best_value is not None
        # background wins where its implied value beats every foreground class (ties go to foreground:
        # a structure half-covering a voxel keeps it, the thin-structure behaviour of the reference's >= 0.5)
        out[(1.0 - total) > best_value] = 0
    return out


def resample_to_spacing(
    data: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    order: int = 3,
    separate_z: bool | None = None,
    order_z: int = 0,
    anisotropy_threshold: float = 3.0,
) -> np.ndarray:
    """Convenience: ``[C, Z, Y, X]`` at ``spacing`` -> float32 at ``target_spacing`` with the separate-axis
    rule of :func:`choose_separate_axis`."""
    new_shape = compute_new_shape(data.shape[1:], spacing, target_spacing)
    axis = choose_separate_axis(spacing, target_spacing, separate_z, anisotropy_threshold)
    return resample_channels(data, new_shape, order, axis, order_z)


# ------------------------------------------------------------------------------------ slab by slab
# Weights below this fraction of a row's largest weight are dropped from a row of an interpolation matrix:
# spline orders > 1 have an infinite (exponentially decaying) prefilter response, and for cubic splines
# 1e-12 is reached within about 21 rows (pole -0.268), far below float32 resolution.
_MATRIX_CUTOFF = 1e-12


def interpolation_matrix(in_length: int, out_length: int, order: int) -> np.ndarray:
    """The 1D resize of :func:`resample_volume` along one axis as a float64 matrix ``[out_length, in_length]``.

    Column ``j`` is the resized unit impulse at ``j`` (same grid_mode mapping, boundary mode and spline
    prefilter as :func:`_zoom`); every step of the resize is linear, so ``matrix @ v`` is the resized ``v``.
    Order 0 gives exactly one 1.0 per row and order 1 at most two non-zeros, so an output row depends on a
    row or two of the input, which is what lets :func:`iter_resampled_slabs` work on slabs.
    """
    in_length, out_length = int(in_length), int(out_length)
    matrix = np.empty((out_length, in_length), dtype=np.float64)
    impulse = np.zeros(in_length, dtype=np.float64)
    for j in range(in_length):
        impulse[j] = 1.0
        column = ndimage.zoom(impulse, out_length / in_length, order=order, mode=_MODE, grid_mode=True,
                              prefilter=order > 1)
        impulse[j] = 0.0
        if column.shape != (out_length,):
            raise AssertionError(f"zoom produced {column.shape}, expected ({out_length},)")
        matrix[:, j] = column
    largest = np.abs(matrix).max(axis=1, keepdims=True)
    matrix[np.abs(matrix) < _MATRIX_CUTOFF * largest] = 0.0
    return matrix


def row_interpolation_matrix(
    in_length: int, out_length: int, order: int, separate_axis: int | None = None, order_z: int = 0
) -> np.ndarray:
    """:func:`interpolation_matrix` for the first axis of a 3D volume under the rules of
    :func:`resample_volume`: ``order_z`` when axis 0 is the separate axis (exact identity when its length does
    not change, as resample_volume then skips it), else ``order``."""
    if separate_axis == 0:
        if in_length == out_length:
            return np.eye(int(in_length), dtype=np.float64)
        return interpolation_matrix(in_length, out_length, order_z)
    return interpolation_matrix(in_length, out_length, order)


def resample_plane(
    plane: np.ndarray, new_plane_shape: Sequence[int], order: int, separate_axis: int | None = None, order_z: int = 0
) -> np.ndarray:
    """One slice ``[Y, X]`` of a 3D volume resized in-plane (float32 ``new_plane_shape``), with the orders
    :func:`resample_volume` uses on axes 1 and 2 for ``separate_axis`` (an axis of the 3D volume)."""
    if separate_axis in (1, 2):
        return resample_volume(plane, new_plane_shape, order, separate_axis - 1, order_z)
    return _zoom(plane, new_plane_shape, order)


def iter_resampled_slabs(
    channels: np.ndarray,
    new_shape: Sequence[int],
    order: int,
    separate_axis: int | None = None,
    order_z: int = 0,
    rows_per_slab: int = 8,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """:func:`resample_channels` one slab of output rows at a time: yields ``(start, stop, slab)`` with
    ``slab`` float32 ``[C, stop - start, *new_shape[1:]]`` equal to ``resample_channels(channels, new_shape,
    order, separate_axis, order_z)[:, start:stop]``, for consecutive slabs covering axis 0.

    ``channels``: ``[C, Z, Y, X]`` of any float dtype (e.g. float16; converted one input row at a time).
    How: resampling is separable, so each input row is resized in-plane (:func:`resample_plane`) and output
    rows are weighted sums of those rows (:func:`row_interpolation_matrix`). A slab needs only the input rows
    its matrix rows touch (for orders <= 1: the rows around it, one or two per output row; the halo comes from
    the matrix, not a guess); rows shared with the previous slab are reused. Orders 0 give bit-identical
    values (a row is copied); higher orders agree to float32 rounding (sums in another order).
    Memory: the input rows of one slab and the slab itself, C channels each, never the whole volume.
    """
    new_shape = tuple(int(n) for n in new_shape)
    if channels.ndim != 4 or len(new_shape) != 3:
        raise ValueError(f"expected channels [C, Z, Y, X] and a 3D shape, got {channels.shape} and {new_shape}")
    rows_per_slab = max(1, int(rows_per_slab))
    count, out_length = channels.shape[0], new_shape[0]
    if tuple(channels.shape[1:]) == new_shape:  # nothing to interpolate: copy the values bit-exactly
        for start in range(0, out_length, rows_per_slab):
            stop = min(start + rows_per_slab, out_length)
            yield start, stop, np.array(channels[:, start:stop], dtype=np.float32)
        return
    plane_shape = new_shape[1:]
    matrix = row_interpolation_matrix(channels.shape[1], out_length, order, separate_axis, order_z)
    cached_first, cached = 0, np.empty((count, 0, *plane_shape), dtype=np.float32)
    for start in range(0, out_length, rows_per_slab):
        stop = min(start + rows_per_slab, out_length)
        used = np.flatnonzero(np.any(matrix[start:stop] != 0, axis=0))
        first, last = int(used[0]), int(used[-1]) + 1
        planes = np.empty((count, last - first, *plane_shape), dtype=np.float32)
        for row in range(first, last):
            if cached_first <= row < cached_first + cached.shape[1]:
                planes[:, row - first] = cached[:, row - cached_first]
                continue
            for channel in range(count):
                source = np.asarray(channels[channel, row], dtype=np.float32)
                planes[channel, row - first] = resample_plane(source, plane_shape, order, separate_axis, order_z)
        cached_first, cached = first, planes
        slab = np.zeros((count, stop - start, *plane_shape), dtype=np.float32)
        for out_row in range(start, stop):
            for row in np.flatnonzero(matrix[out_row, first:last]):
                slab[:, out_row - start] += np.float32(matrix[out_row, first + row]) * planes[:, row]
        yield start, stop, slab
