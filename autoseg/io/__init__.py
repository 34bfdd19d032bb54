"""Image I/O behind one interface: arrays are channel-first ``[C, (Z,) Y, X]`` and never travel without
their :class:`Geometry`."""
from autoseg.io.dicom import (
    DICOM_SEG_ENDING,
    DicomSeries,
    find_dicom_series,
    is_dicom_file,
    read_dicom_geometry,
    read_dicom_series,
    write_dicom_seg,
)
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
from autoseg.io.regrid import labels_onto_geometry

__all__ = [
    "DICOM_SEG_ENDING",
    "DicomSeries",
    "Geometry",
    "NATURAL_IMAGE_ENDINGS",
    "SUPPORTED_ENDINGS",
    "VOLUME_ENDINGS",
    "file_ending",
    "find_dicom_series",
    "is_dicom_file",
    "is_natural_image",
    "labels_onto_geometry",
    "read_channels",
    "read_dicom_geometry",
    "read_dicom_series",
    "read_image",
    "read_segmentation",
    "write_dicom_seg",
    "write_image",
    "write_segmentation",
]
