"""Sliding-window prediction: the numerics, as small pure functions plus one driver.

The image is covered by overlapping windows of exactly the planned patch size (networks such as UNETR++ are
built for one patch and accept nothing else). Each window's logits are weighted by a Gaussian importance map,
so voxels near a window's border (where the network saw little context) count less, and the weighted sum is
divided by the summed weights. Numbers from the nnU-Net method (Isensee et al., Nature Methods 2021):
step 0.5 of the patch, sigma = 1/8 of the patch, test-time mirroring over all spatial axes, logits
accumulated on the GPU when they fit.

Axis conventions (style.md): data is ``[C, Z, Y, X]``; ``patch_size`` has one entry per *network* axis
(3 for 3D, 2 for 2D). A 2D network predicts each Z slice of the 4D array with 2D windows.
"""
from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Gaussian weights over one window, float32 of shape ``patch_size``, maximum 1.

    The centre is the geometric centre ``(p - 1) / 2`` of each axis, so the map is exactly symmetric under
    flipping (mirroring then stays exactly undoable). ``sigma = p * sigma_scale`` voxels per axis (nnU-Net:
    1/8). Values that underflow to 0 in float32 are replaced by the smallest non-zero value, so every voxel of
    every window keeps a positive weight and the division by the summed weights is always defined.
    """
    axes = []
    for p in patch_size:
        p = int(p)
        if p <= 0:
            raise ValueError(f"patch size must be positive, got {tuple(patch_size)}")
        sigma = max(p * sigma_scale, 1e-6)
        coords = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        axes.append(np.exp(-0.5 * (coords / sigma) ** 2))
    weights = axes[0]
    for axis in axes[1:]:
        weights = np.multiply.outer(weights, axis)
    weights = np.asarray(weights / weights.max(), dtype=np.float32)
    positive = weights[weights > 0]
    # with float32 underflow a tiny sigma can zero the corners; 1.0 exists, so `positive` is never empty
    weights[weights == 0] = positive.min()
    return weights


def compute_tile_starts(
    image_shape: Sequence[int], patch_size: Sequence[int], step_size: float = 0.5
) -> list[list[int]]:
    """Per axis, the start indices of the windows along that axis.

    ``image_shape`` and ``patch_size`` have the same length and ``image_shape >= patch_size`` on every axis
    (pad first, :func:`pad_to_patch`). The number of windows per axis is the fewest whose spacing does not
    exceed ``step_size * patch``; they are spread evenly from 0 to ``size - patch``, so the first window
    touches the start, the last one the end, and every voxel is covered.
    """
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size is a fraction of the patch in (0, 1], got {step_size}")
    if len(image_shape) != len(patch_size):
        raise ValueError(f"image shape {tuple(image_shape)} and patch {tuple(patch_size)} differ in length")
    starts = []
    for size, patch in zip(image_shape, patch_size):
        size, patch = int(size), int(patch)
        if size < patch:
            raise ValueError(f"image shape {tuple(image_shape)} is smaller than patch {tuple(patch_size)}; pad first")
        # never less than one voxel: a 2D model's window is one slice deep, and half a slice rounded to whole
        # starts visited every slice twice (0, 1, 1, 2, 2, ...), twice the network work for the same mean
        target_step = max(patch * step_size, 1.0)
        n_windows = int(math.ceil((size - patch) / target_step)) + 1
        if n_windows == 1:
            starts.append([0])
            continue
        actual_step = (size - patch) / (n_windows - 1)
        # round half up (not Python's half-to-even) so the spacing pattern is the same on every axis
        starts.append([int(math.floor(actual_step * i + 0.5)) for i in range(n_windows)])
    return starts


def pad_to_patch(data: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the trailing ``len(patch_size)`` axes of ``data`` up to ``patch_size`` where smaller.

    Padding is split evenly on both sides (extra voxel at the end). Returns the padded tensor and the
    slices (one per axis of ``data``) that cut the original region back out: ``padded[slices]`` equals
    ``data``. Axes already at least as large are left alone.
    """
    spatial = data.shape[-len(patch_size):]
    lead = data.ndim - len(patch_size)
    pads: list[tuple[int, int]] = []
    for size, patch in zip(spatial, patch_size):
        missing = max(0, int(patch) - int(size))
        pads.append((missing // 2, missing - missing // 2))
    slices = tuple([slice(None)] * lead + [slice(lo, lo + size) for (lo, _), size in zip(pads, spatial)])
    if not any(lo or hi for lo, hi in pads):
        return data, slices
    # F.pad takes (last axis lo, hi, second-to-last lo, hi, ...)
    flat = [v for lo_hi in reversed(pads) for v in lo_hi]
    return torch.nn.functional.pad(data, flat, mode="constant", value=0.0), slices


def window_slices(tile_starts: Sequence[Sequence[int]], patch_size: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """All windows as tuples of slices over the spatial axes, in C order of the start grid."""
    for start in itertools.product(*tile_starts):
        yield tuple(slice(s, s + int(p)) for s, p in zip(start, patch_size))


def mirror_axis_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes (as indices counted from the first spatial axis), empty set first.

    3D gives 8 sets, 2D gives 4 (nnU-Net mirrors over all combinations of the trained mirror axes).
    """
    axes = range(spatial_dims)
    return [combo for r in range(spatial_dims + 1) for combo in itertools.combinations(axes, r)]


def _forward_logits(network: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Network logits at the input resolution; with deep supervision only the highest resolution."""
    output = network(batch)
    if isinstance(output, (list, tuple)):
        output = output[0]
    return output


def _predict_windows(
    network: nn.Module, batch: torch.Tensor, mirror: bool, amp: torch.dtype | None
) -> torch.Tensor:
    """Logits ``[B, K, *window]`` float32 for a batch ``[B, C, *window]``, averaged over mirrorings.

    Each mirrored prediction is flipped back before averaging, so mirroring is exactly undone.
    """
    spatial_dims = batch.ndim - 2
    axis_sets = mirror_axis_sets(spatial_dims) if mirror else [()]
    autocast = (
        torch.autocast(device_type=batch.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    )
    total: torch.Tensor | None = None
    with autocast:
        for axes in axis_sets:
            dims = [a + 2 for a in axes]
            inputs = torch.flip(batch, dims) if dims else batch
            logits = _forward_logits(network, inputs).float()
            if dims:
                logits = torch.flip(logits, dims)
            total = logits if total is None else total + logits
    assert total is not None
    return total / len(axis_sets)


def _allocate(
    shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.device]:
    """A zero tensor of ``dtype`` on ``device``; on out-of-memory the CPU instead (nnU-Net does the same)."""
    if device.type != "cpu":
        try:
            return torch.zeros(tuple(shape), dtype=dtype, device=device), device
        except torch.cuda.OutOfMemoryError:
            log.info("accumulator of shape %s does not fit on %s; accumulating on the CPU", tuple(shape), device)
            torch.cuda.empty_cache()
    return torch.zeros(tuple(shape), dtype=dtype), torch.device("cpu")


def summed_window_weights(
    spatial_shape: Sequence[int], tiles: Sequence[tuple[slice, ...]], gaussian: torch.Tensor
) -> torch.Tensor:
    """float32 ``[*spatial_shape]``: at every voxel the sum of the Gaussian weights of the windows covering it.

    ``tiles``: window slices over the spatial axes (:func:`window_slices`); ``gaussian``: the importance map
    of one window (float32, on the device the sum is wanted on). Positive wherever a window lies.
    """
    weight_sum = torch.zeros(tuple(spatial_shape), dtype=torch.float32, device=gaussian.device)
    for tile in tiles:
        weight_sum[tile] += gaussian
    return weight_sum


def map_slabs(
    array: torch.Tensor,
    function: Callable[..., torch.Tensor],
    *others: torch.Tensor,
    rows: int | None = None,
) -> torch.Tensor:
    """``array[:, slab] = function(array[:, slab], *(other[:, slab] for other in others))`` for consecutive
    slabs of ``rows`` along the second axis (Z of ``[K, Z, Y, X]``), in place; returns ``array``.

    ``function`` gets and returns float32 blocks; results are stored back in ``array``'s dtype. So a float16
    volume goes through a softmax, a log-softmax or a fold combination without ever holding a float32 copy of
    the whole volume: the float32 temporaries are one slab each (default: about 64 MiB).
    """
    plane = max(1, int(np.prod(array.shape[2:])) * int(array.shape[0]))
    rows = rows or max(1, (64 << 20) // (4 * plane))
    for start in range(0, array.shape[1], rows):
        block = array[:, start:start + rows]
        block.copy_(function(block.float(), *(other[:, start:start + rows].float() for other in others)))
    return array


def prepare_windows(
    data: torch.Tensor | np.ndarray, patch_size: Sequence[int], dims: int, step_size: float, caller: str
) -> tuple[torch.Tensor, tuple[slice, ...], tuple[int, ...], list[tuple[slice, ...]]]:
    """``(padded float32 [C, Z', Y', X'], unpad slices, 3D window, window slices)`` for a whole-image pass.

    A 2D network sees windows of one slice: its patch becomes a 3D window of depth 1, squeezed before the
    forward. ``caller`` names the function in the error for input that is not ``[C, Z, Y, X]``.
    """
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    if data.ndim != 4:
        raise ValueError(f"{caller} expects [C, Z, Y, X], got shape {tuple(data.shape)}")
    if dims not in (2, 3) or len(patch_size) != dims:
        raise ValueError(f"patch {tuple(patch_size)} does not match dims={dims}")
    window = tuple(int(p) for p in patch_size) if dims == 3 else (1, *(int(p) for p in patch_size))
    padded, unpad = pad_to_patch(data.float(), window)
    tiles = list(window_slices(compute_tile_starts(tuple(padded.shape[1:]), window, step_size), window))
    return padded, unpad, window, tiles


def sliding_window_predict(
    network: nn.Module,
    data: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    dims: int,
    num_classes: int,
    step_size: float = 0.5,
    mirror: bool = True,
    device: torch.device | str = "cpu",
    batch_size: int = 2,
    amp: torch.dtype | None = None,
    softmax: bool = False,
    sigma_scale: float = 1.0 / 8,
    progress: bool = False,
    accumulator_dtype: torch.dtype = torch.float16,
    log_softmax: bool = False,
    to_cpu: bool = True,
) -> torch.Tensor:
    """Predict a whole preprocessed image with overlapping windows.

    ``data``: ``[C, Z, Y, X]`` (float32). ``patch_size``: ``dims`` entries (3D: ``(pz, py, px)``; 2D:
    ``(py, px)``, each Z slice predicted on its own). ``batch_size`` windows go through the network at once.
    ``amp``: autocast dtype (``autoseg.device.amp_dtype``) or None. Returns ``[K, Z, Y, X]`` of
    ``accumulator_dtype`` on the CPU: Gaussian-weighted mean logits, or their softmax over K when ``softmax``,
    or their log-softmax when ``log_softmax`` (floored at the dtype's most negative finite value: float16
    would give -inf beyond it, and -inf times an interpolation weight of 0 is NaN). Both run where the
    accumulator is, so on the GPU the CPU never makes a pass over the volume. ``to_cpu=False`` returns the
    result where it was accumulated (``device``, or the CPU when it did not fit there).
    The network must already be on ``device`` and in eval mode; call under ``torch.inference_mode()``.

    Memory: the accumulator ``[K, Z, Y, X]`` is the one array the size of the image times the classes, so it is
    float16 by default (half of float32: 50 classes on a 512 x 512 x 600 grid are 15.7 GB instead of 31.5 GB).
    To keep float16 precise, every window is weighted by its Gaussian divided by the summed weights of all
    windows (a float32 ``[Z, Y, X]``, computed first): the accumulator then only ever holds a convex
    combination of logits, bounded by the largest logit, instead of a sum of weighted logits that grows with
    the overlap. Each window adds in float32 and rounds once to float16 (relative 2**-11); the result differs from
    a float32 accumulator by about 1e-3 of the largest logit (tests/inference/test_sliding_window.py).
    """
    device = torch.device(device)
    padded, unpad, window, tiles = prepare_windows(data, patch_size, dims, step_size, "sliding_window_predict")
    spatial = tuple(padded.shape[1:])

    accumulated, acc_device = _allocate((num_classes, *spatial), device, accumulator_dtype)
    gaussian = torch.from_numpy(gaussian_importance_map(window, sigma_scale)).to(acc_device)
    weight_sum = summed_window_weights(spatial, tiles, gaussian)
    # float16 overflows at 65504: clamp, so one absurd logit cannot become inf (and NaN in the softmax)
    limit = float(torch.finfo(accumulator_dtype).max) if accumulator_dtype.is_floating_point else None

    iterator: Iterator[int] = iter(range(0, len(tiles), batch_size))
    if progress:
        from tqdm import tqdm

        iterator = iter(tqdm(list(iterator), desc="windows", leave=False, unit="batch"))
    for first in iterator:
        batch_tiles = tiles[first:first + batch_size]
        batch = torch.stack([padded[(slice(None), *tile)] for tile in batch_tiles]).to(device, non_blocking=True)
        if dims == 2:
            batch = batch[:, :, 0]
        logits = _predict_windows(network, batch, mirror, amp)
        if dims == 2:
            logits = logits[:, :, None]
        if logits.shape[1] != num_classes or tuple(logits.shape[2:]) != window:
            raise ValueError(
                f"network returned {tuple(logits.shape)} for windows {window}; expected {num_classes} classes "
                "at the window size"
            )
        logits = logits.to(acc_device)
        for tile, window_logits in zip(batch_tiles, logits):
            target = accumulated[(slice(None), *tile)]
            # add in float32 and round once (adding a float16 copy of the contribution would round twice)
            updated = target.float() + window_logits * (gaussian / weight_sum[tile])
            if limit is not None:
                updated = updated.clamp_(-limit, limit)
            target.copy_(updated)
    del weight_sum
    result = accumulated[unpad]
    if softmax:
        result = map_slabs(result, lambda block: torch.softmax(block, dim=0))
    elif log_softmax:
        floor = float(torch.finfo(accumulator_dtype).min)
        result = map_slabs(result, lambda block: torch.log_softmax(block, dim=0).clamp_(min=floor))
    return result.cpu() if to_cpu else result


# ------------------------------------------------------------------------- band streaming (bounded memory)
def first_axis_bands(first_axis_starts: Sequence[int], length: int) -> list[tuple[int, int, int, int]]:
    """Bands of windows along the first axis, for streaming: ``(first, stop, done, final)`` per band.

    ``first_axis_starts``: the first-axis start of every window, in the (C) order of :func:`window_slices`,
    so non-decreasing. Band ``i`` is the windows ``first:stop`` that start at row ``done`` (the i-th distinct
    start). Once they are added, no later window touches a row below ``final`` (the next band's start, or
    ``length`` after the last band): rows ``done:final`` are final.
    """
    bands: list[tuple[int, int, int, int]] = []
    first, count = 0, len(first_axis_starts)
    while first < count:
        done = int(first_axis_starts[first])
        stop = bisect.bisect_right(first_axis_starts, done, lo=first)
        bands.append((first, stop, done, int(first_axis_starts[stop]) if stop < count else int(length)))
        first = stop
    return bands


def _band_weights(
    tiles: Sequence[tuple[slice, ...]],
    first_axis_starts: Sequence[int],
    rows: tuple[int, int],
    plane: Sequence[int],
    gaussian: torch.Tensor,
) -> torch.Tensor:
    """float32 ``[rows, *plane]``: :func:`summed_window_weights` restricted to rows ``rows[0]:rows[1]`` of the
    first axis (``plane``: the other spatial axes of the padded image).

    Only windows overlapping those rows add, in the same order as for the whole volume, so every value is
    bit-identical to the whole-volume sum.
    """
    lo, hi = rows
    depth = int(gaussian.shape[0])
    weights = torch.zeros((hi - lo, *(int(n) for n in plane)), dtype=torch.float32, device=gaussian.device)
    # windows are sorted by first-axis start: those touching [lo, hi) start in (lo - depth, hi)
    for index in range(bisect.bisect_right(first_axis_starts, lo - depth), bisect.bisect_left(first_axis_starts, hi)):
        tile = tiles[index]
        top, bottom = max(tile[0].start, lo), min(tile[0].stop, hi)
        weights[(slice(top - lo, bottom - lo), *tile[1:])] += gaussian[top - tile[0].start:bottom - tile[0].start]
    return weights


def iter_log_softmax_rows(
    network: nn.Module,
    data: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    dims: int,
    num_classes: int,
    step_size: float = 0.5,
    mirror: bool = True,
    device: torch.device | str = "cpu",
    batch_size: int = 2,
    amp: torch.dtype | None = None,
    sigma_scale: float = 1.0 / 8,
    accumulator_dtype: torch.dtype = torch.float16,
    block_bytes: int = 64 << 20,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """:func:`sliding_window_predict` with ``log_softmax=True``, streamed along the first axis: yields
    ``(start, stop, block)`` for consecutive rows of the unpadded image, ``block`` of ``accumulator_dtype``
    ``[K, stop - start, Y, X]`` on the device it was accumulated on, equal to ``[:, start:stop]`` of the
    whole-volume result.

    How: the windows are added in the order of :func:`sliding_window_predict` (sorted by first-axis start),
    band by band (:func:`first_axis_bands`), into a rolling buffer one patch deep; rows that no remaining
    window touches are final and leave (log-softmax in float32, ``block_bytes`` of float32 at a time), the
    rest move up. The network sees the same batches (``batch_size`` consecutive windows); a batch reaching
    into the next band keeps those windows' logits until that band. Same arithmetic as the whole-volume
    accumulator: each window is weighted by its Gaussian over the summed weights (computed per band,
    bit-identical to the whole-volume sum), added in float32 and rounded once to ``accumulator_dtype``, in
    the same order; so the rows are bit-identical to the whole-volume result where the log-softmax kernel
    rounds alike (it did on every CPU we tried).

    Memory, instead of ``[K, Z, Y, X]``: the buffer ``[K, patch depth, Y, X]`` of ``accumulator_dtype`` (2D: one
    row), a float32 ``[patch depth, Y, X]`` of weights and one batch of window logits (float32
    ``[batch_size, K, *patch]``). The input ``data`` (``[C, Z, Y, X]``) stays whole.
    """
    device = torch.device(device)
    padded, unpad, window, tiles = prepare_windows(data, patch_size, dims, step_size, "iter_log_softmax_rows")
    spatial = tuple(padded.shape[1:])
    starts = [int(tile[0].start) for tile in tiles]
    bands = first_axis_bands(starts, spatial[0])
    capacity = window[0]  # a band's windows cover rows done:done + depth; the next band starts at most there

    buffer, acc_device = _allocate((num_classes, capacity, *spatial[1:]), device, accumulator_dtype)
    gaussian = torch.from_numpy(gaussian_importance_map(window, sigma_scale)).to(acc_device)
    limit = float(torch.finfo(accumulator_dtype).max) if accumulator_dtype.is_floating_point else None
    floor = float(torch.finfo(accumulator_dtype).min)
    out_rows, plane = unpad[1], (slice(None), slice(None), *unpad[2:])
    row_bytes = 4 * num_classes * int(np.prod(padded.shape[2:]))
    rows_per_block = max(1, int(block_bytes) // row_bytes)
    pending: dict[int, torch.Tensor] = {}  # window index -> logits of a batch that reached past its band
    for first, stop, done, final in bands:
        weights = _band_weights(tiles, starts, (done, done + capacity), spatial[1:], gaussian)
        for index in range(first, stop):
            if index not in pending:  # the first window of the next batch (batches start at multiples of batch_size)
                batch_tiles = tiles[index:index + batch_size]
                batch = torch.stack([padded[(slice(None), *tile)] for tile in batch_tiles]).to(device, non_blocking=True)
                if dims == 2:
                    batch = batch[:, :, 0]
                logits = _predict_windows(network, batch, mirror, amp)
                if dims == 2:
                    logits = logits[:, :, None]
                if logits.shape[1] != num_classes or tuple(logits.shape[2:]) != window:
                    raise ValueError(
                        f"network returned {tuple(logits.shape)} for windows {window}; expected {num_classes} "
                        "classes at the window size"
                    )
                pending.update(zip(range(index, index + len(batch_tiles)), logits.to(acc_device)))
            tile, window_logits = tiles[index], pending.pop(index)
            local = (slice(tile[0].start - done, tile[0].stop - done), *tile[1:])
            target = buffer[(slice(None), *local)]
            updated = target.float() + window_logits * (gaussian / weights[local])
            if limit is not None:
                updated = updated.clamp_(-limit, limit)
            target.copy_(updated)
        # rows done:final are final; of them, only those inside the unpadded image leave
        for row in range(max(done, out_rows.start), min(final, out_rows.stop), rows_per_block):
            last = min(row + rows_per_block, final, out_rows.stop)
            block = buffer[:, row - done:last - done][plane]
            yield (row - out_rows.start, last - out_rows.start,
                   torch.log_softmax(block.float(), dim=0).clamp_(min=floor).to(accumulator_dtype))
        shift = final - done
        if shift < capacity:  # the rows still open move to the top of the buffer
            buffer[:, :capacity - shift] = buffer[:, shift:].clone()
        buffer[:, max(0, capacity - shift):] = 0
