"""Carry a label map from one grid onto another by physical position.

Two files can describe the same voxels with different index orders: a NIfTI written by one tool may store
the y axis flipped relative to the DICOM series it came from (origin at the other end, direction cosine
negated). Comparing such arrays index by index compares the wrong voxels; mapping through physical space
puts every label where it belongs.
"""
from __future__ import annotations

import numpy as np

from autoseg.io.geometry import Geometry


def index_to_index_transform(source: Geometry, target: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix, offset)`` with ``source_index = matrix @ target_index + offset``, both in array axis order.

    A voxel's physical position is ``origin + direction @ (spacing * index)`` with the index, spacing and
    the direction's columns in ITK order (x, y, z), i.e. the array order reversed (:class:`Geometry`).
    """
    if source.dims != target.dims:
        raise ValueError(f"cannot map a {source.dims}D grid onto a {target.dims}D grid")
    dims = source.dims
    reverse = np.eye(dims)[::-1]  # array order <-> ITK order (its own inverse)
    source_axes = np.asarray(source.direction, dtype=np.float64).reshape(dims, dims) * np.asarray(
        source.spacing[::-1], dtype=np.float64
    )
    target_axes = np.asarray(target.direction, dtype=np.float64).reshape(dims, dims) * np.asarray(
        target.spacing[::-1], dtype=np.float64
    )
    # physical = origin_t + A_t i_t = origin_s + A_s i_s  (i in ITK order)
    itk_matrix = np.linalg.solve(source_axes, target_axes)
    itk_offset = np.linalg.solve(source_axes, np.asarray(target.origin) - np.asarray(source.origin))
    return reverse @ itk_matrix @ reverse, reverse @ itk_offset


def labels_onto_geometry(labels: np.ndarray, source: Geometry, target: Geometry, fill: int = 0) -> np.ndarray:
    """Nearest-neighbour resampling of a label map ``[(Z,) Y, X]`` on grid ``source`` onto grid ``target``.

    Each target voxel takes the label of the source voxel nearest to its physical centre, or ``fill`` when
    that lies outside the source grid. When the two grids hold the same voxels in another index order
    (flipped or permuted axes), every source index comes out an integer and the result is exact. Works one
    slice of the first target axis at a time, so memory stays at a few slices of float64 indices.
    """
    labels = np.asarray(labels)
    if tuple(labels.shape) != tuple(source.shape):
        raise ValueError(f"labels shape {labels.shape} does not match the source geometry shape {source.shape}")
    matrix, offset = index_to_index_transform(source, target)
    output = np.full(target.shape, fill, dtype=labels.dtype)
    rest = np.indices(target.shape[1:], dtype=np.float64).reshape(target.dims - 1, -1)
    bounds = np.asarray(source.shape)[:, None]
    for first in range(target.shape[0]):
        target_index = np.vstack([np.full((1, rest.shape[1]), float(first)), rest])
        # rint: exact integers stay exact; 1e-6 voxel of rounding noise never moves a voxel
        source_index = np.rint(matrix @ target_index + offset[:, None]).astype(np.int64)
        inside = np.all((source_index >= 0) & (source_index < bounds), axis=0)
        plane = np.full(rest.shape[1], fill, dtype=labels.dtype)
        plane[inside] = labels[tuple(source_index[:, inside])]
        output[first] = plane.reshape(target.shape[1:])
    return output
