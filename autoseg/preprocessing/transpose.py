"""Axis transposition of one case: raw array order <-> the plan's working order (pure functions).

The plan (``Plans.transpose_forward``, decided by :func:`autoseg.planning.spacing.coarse_axis_first`) names
the raw array axes in the order the configurations work in: working axis ``i`` is raw axis ``forward[i]``.
Preprocessing transposes first (reference/nnunet.md, "Preprocessing order": transpose -> crop -> ...);
restoring transposes back last, so predictions come out in the input file's own axis order.

Orders are lists over the spatial axes only; arrays may carry leading axes (channels), which stay in place.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence, TypeVar

import numpy as np

from autoseg.contracts.plans import inverse_permutation
from autoseg.io import Geometry

T = TypeVar("T")


def is_identity(order: Sequence[int] | None) -> bool:
    """True for None or ``[0, 1, ..., n-1]``: nothing to transpose."""
    return order is None or list(order) == list(range(len(order)))


def transpose_values(values: Sequence[T], order: Sequence[int]) -> list[T]:
    """Per-axis values (spacing, shape) reordered: ``result[i] = values[order[i]]``."""
    if len(values) != len(order):
        raise ValueError(f"{len(values)} per-axis values {list(values)} for an order over {len(order)} axes {list(order)}")
    return [values[a] for a in order]


def transpose_array(array: np.ndarray, order: Sequence[int] | None) -> np.ndarray:
    """``array`` ``[*lead, *spatial]`` with its last ``len(order)`` (spatial) axes reordered by ``order``
    (leading axes such as channels stay put). A view, or ``array`` itself for the identity (or None)."""
    if order is None or is_identity(order):
        return array
    spatial = len(order)
    if array.ndim < spatial:
        raise ValueError(f"array of shape {array.shape} has fewer than {spatial} axes to transpose by {list(order)}")
    lead = array.ndim - spatial
    return array.transpose((*range(lead), *(lead + int(a) for a in order)))


def untranspose_array(array: np.ndarray, order: Sequence[int] | None) -> np.ndarray:
    """The inverse of :func:`transpose_array` for the same ``order``: working order back to raw order,
    C-contiguous (writers and later numerics expect it); ``array`` itself for the identity (or None)."""
    if order is None or is_identity(order):
        return array
    return np.ascontiguousarray(transpose_array(array, inverse_permutation(order)))


def transpose_geometry(geometry: Geometry, order: Sequence[int]) -> Geometry:
    """The geometry of the transposed array: shape and spacing reordered, the direction's columns moved with
    their axes, origin unchanged (index 0 along every axis is the same voxel), so every voxel keeps its
    physical position. ``array_axes`` records which file axis each array axis now is (e.g. ``"xzy"``).

    ``direction`` is row-major ``dims x dims`` with one column per *file* index axis, and file axes are the
    array axes reversed (:class:`~autoseg.io.Geometry`): array axis ``a`` is column ``dims - 1 - a``.
    """
    dims = geometry.dims
    order = [int(a) for a in order]
    if len(order) != dims:
        raise ValueError(f"order {order} does not fit a {dims}D geometry")
    if is_identity(order):
        return geometry
    matrix = np.asarray(geometry.direction, dtype=np.float64).reshape(dims, dims)
    # new array axis i = old array axis order[i]; new column dims-1-i = old column dims-1-order[i]
    columns = [dims - 1 - order[dims - 1 - column] for column in range(dims)]
    return replace(
        geometry,
        shape=tuple(transpose_values(list(geometry.shape), order)),
        spacing=tuple(transpose_values(list(geometry.spacing), order)),
        direction=tuple(float(v) for v in matrix[:, columns].reshape(-1)),
        array_axes="".join(transpose_values(list(geometry.array_axes), order))
        if len(geometry.array_axes) == dims else geometry.array_axes,
    )


def case_order(plans_order: Sequence[int] | None, image_dims: int) -> list[int]:
    """The order applied to one image: the plan's, or the identity for images whose dimensionality differs
    from the plan's (2D images are never transposed)."""
    if plans_order is None or len(plans_order) != image_dims:
        return list(range(image_dims))
    return [int(a) for a in plans_order]
