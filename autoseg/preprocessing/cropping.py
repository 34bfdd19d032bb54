"""Crop to the nonzero region of an image and put arrays back (pure numerics).

The reference method crops every case to the bounding box of the voxels that are nonzero in any channel,
with holes in that mask filled (nnU-Net, reference/nnunet.md "Fingerprint" and "Preprocessing order"): the
air around a scan carries no information and costs memory and time in every later stage.

Boxes are ``[[start, stop], ...]`` per spatial axis (stop exclusive), in array axis order.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.ndimage import binary_fill_holes

Box = list[list[int]]


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels that are nonzero in any channel, holes filled.

    ``data``: ``[C, *spatial]`` (any number of spatial axes). Returns bool ``[*spatial]``.
    Hole filling runs in the image's own dimensionality (a 2D image must not get a dummy Z first: in a
    one-slice volume every voxel touches the border and nothing would be filled).
    """
    mask = np.any(data != 0, axis=0)
    return binary_fill_holes(mask)


def bounding_box(mask: np.ndarray) -> Box:
    """Smallest box holding every True voxel of ``mask`` (``[*spatial]``); the whole array when it is empty
    (an all-zero image is kept as is rather than cropped to nothing)."""
    box: Box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(np.any(mask, axis=other)) if other else np.flatnonzero(mask)
        if present.size == 0:
            return [[0, int(n)] for n in mask.shape]
        box.append([int(present[0]), int(present[-1]) + 1])
    return box


def crop_to_box(array: np.ndarray, box: Sequence[Sequence[int]]) -> np.ndarray:
    """``array[..., box]`` on its last ``len(box)`` axes (leading channel axes are kept). Returns a view."""
    leading = (slice(None),) * (array.ndim - len(box))
    return array[leading + tuple(slice(start, stop) for start, stop in box)]


def uncrop(
    array: np.ndarray,
    box: Sequence[Sequence[int]],
    full_shape: Sequence[int],
    fill: float | Sequence[float] = 0,
) -> np.ndarray:
    """Place ``array`` (``[*lead, *cropped]``) into a new ``[*lead, *full_shape]`` array at ``box``.

    ``fill`` is the value outside the box: a scalar, or one value per entry of the first leading axis
    (probabilities: 1 for background, 0 for the other classes).
    """
    lead = array.shape[: array.ndim - len(box)]
    cropped = array.shape[array.ndim - len(box):]
    expected = tuple(stop - start for start, stop in box)
    if tuple(cropped) != expected:
        raise ValueError(f"array spatial shape {tuple(cropped)} does not match box extent {expected}")
    out = np.empty((*lead, *full_shape), dtype=array.dtype)
    if np.ndim(fill) == 0:
        out[...] = fill
    else:
        fill_values = np.asarray(fill, dtype=array.dtype)
        if not lead or fill_values.shape[0] != lead[0]:
            raise ValueError(f"{fill_values.shape[0]} fill values for leading shape {lead}")
        out[...] = fill_values.reshape((-1,) + (1,) * (out.ndim - 1))
    out[(slice(None),) * len(lead) + tuple(slice(start, stop) for start, stop in box)] = array
    return out
