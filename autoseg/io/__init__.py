"""Image I/O behind one interface: arrays are channel-first ``[C, (Z,) Y, X]`` and never travel without
their :class:`Geometry`."""
from autoseg.io.geometry import Geometry
from autoseg.io.readers import (
    NATURAL_IMAGE_ENDINGS,
    SUPPORTED_ENDINGS,
    VOLUME_ENDINGS,
    file_ending,
    is_natural_image,
    read_channels,
    read_image,
    read_segmentation,
    write_image,
    write_segmentation,
)

__all__ = [
    "Geometry",
    "NATURAL_IMAGE_ENDINGS",
    "SUPPORTED_ENDINGS",
    "VOLUME_ENDINGS",
    "file_ending",
    "is_natural_image",
    "read_channels",
    "read_image",
    "read_segmentation",
    "write_image",
    "write_segmentation",
]
