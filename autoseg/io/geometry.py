"""The geometry that travels with every image: losing it is the classic silent bug of this field."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels lie in physical space.

    - ``shape`` and ``spacing`` are in array axis order (``(Z, Y, X)`` in 3D, ``(Y, X)`` in 2D), the same
      order as the numpy array autoseg hands around. Spacing is in mm.
    - ``origin`` and ``direction`` are physical (ITK/LPS convention, x first) and are written back unchanged.
      ``direction`` is the row-major ``dims x dims`` cosine matrix.
    - Array axes are the file's index axes reversed (file index order is x, y, z): ``array_axes`` records
      that so a reader can map back to the file's own order.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    array_axes: str = field(default="zyx")

    @property
    def dims(self) -> int:
        return len(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "array_axes": self.array_axes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Geometry":
        return cls(
            shape=tuple(int(v) for v in data["shape"]),
            spacing=tuple(float(v) for v in data["spacing"]),
            origin=tuple(float(v) for v in data["origin"]),
            direction=tuple(float(v) for v in data["direction"]),
            array_axes=str(data.get("array_axes", "zyx")),
        )

    def mismatch(self, other: "Geometry", tolerance: float = 1e-4) -> list[str]:
        """Human-readable differences with ``other`` (shape exact; spacing/origin/direction relative to
        ``tolerance``). Empty list when the two describe the same grid."""
        problems = []
        if self.shape != other.shape:
            problems.append(f"shape {self.shape} vs {other.shape}")
        if len(self.spacing) == len(other.spacing):
            if not np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=tolerance):
                problems.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}")
            if not np.allclose(self.origin, other.origin, rtol=tolerance, atol=tolerance * 10):
                problems.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)}")
            if not np.allclose(self.direction, other.direction, atol=tolerance * 10):
                problems.append(f"direction {_fmt(self.direction)} vs {_fmt(other.direction)}")
        return problems


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
