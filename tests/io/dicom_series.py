"""Small synthetic DICOM CT series written with pydicom, for tests that need known geometry and values.

Each slice is a CT Image Storage file, uncompressed (explicit VR little endian), so pydicom can decode it
too and the tests can compare against an independent reading of the stored values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from autoseg.io import Geometry

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
EXAMPLE = SHARED / "datasets" / "DICOM_CT_example"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def oblique_orientation(angle_degrees: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines rotated about the patient's y axis, so no axis is aligned."""
    angle = np.deg2rad(angle_degrees)
    row = np.array([np.cos(angle), 0.0, np.sin(angle)])
    column = np.array([0.0, 1.0, 0.0])
    return row, column


def write_series(
    folder: Path,
    stored: np.ndarray,
    pixel_spacing: tuple[float, float] = (0.7, 0.9),
    slice_spacing: float = 2.5,
    origin: Sequence[float] = (-20.0, 10.0, 35.0),
    orientation: tuple[np.ndarray, np.ndarray] | None = None,
    slope: float = 2.0,
    intercept: float = -1000.0,
    series_uid: str | None = None,
    description: str = "synthetic CT",
    series_number: int = 3,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    skip_slices: Sequence[int] = (),
    prefix: str = "slice",
    tilt_mm_per_slice: float = 0.0,
) -> tuple[list[Path], Geometry]:
    """Write ``stored`` ``[Z, Y, X]`` (uint16 stored values) as one series; returns the files in Z order and
    the geometry the series describes.

    File names run against Z order and InstanceNumber counts down along the normal, so a reader that sorts
    by name or number gets the order wrong. SliceThickness is written as twice the true spacing so that a
    reader taking it for the spacing gets that wrong too.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    row, column = orientation if orientation is not None else (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]))
    normal = np.cross(row, column)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    slices, rows, columns = stored.shape
    files = []
    for index in range(slices):
        # a gantry tilt shifts each slice along the column direction as well as along the normal
        position = np.asarray(origin, dtype=float) + index * (slice_spacing * normal + tilt_mm_per_slice * column)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset = pydicom.Dataset()
        dataset.file_meta = meta
        dataset.SOPClassUID = meta.MediaStorageSOPClassUID
        dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.FrameOfReferenceUID = frame_of_reference_uid
        dataset.SeriesDescription = description
        dataset.SeriesNumber = series_number
        dataset.InstanceNumber = slices - index
        dataset.Modality = "CT"
        dataset.PatientID = "synthetic"
        dataset.PatientName = "Synthetic^Patient"
        dataset.StudyDate = "20240101"
        dataset.StudyTime = "120000"
        dataset.AccessionNumber = ""
        dataset.ReferringPhysicianName = ""
        dataset.StudyID = "1"
        dataset.PatientBirthDate = ""
        dataset.PatientSex = ""
        dataset.Manufacturer = "autoseg tests"
        dataset.ImagePositionPatient = [f"{v:.6f}" for v in position]
        dataset.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *column)]
        dataset.PixelSpacing = [f"{pixel_spacing[0]}", f"{pixel_spacing[1]}"]
        dataset.SliceThickness = f"{2 * slice_spacing}"
        dataset.Rows, dataset.Columns = rows, columns
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated = 16
        dataset.BitsStored = 16
        dataset.HighBit = 15
        dataset.PixelRepresentation = 0
        dataset.RescaleSlope = f"{slope}"
        dataset.RescaleIntercept = f"{intercept}"
        dataset.PixelData = np.ascontiguousarray(stored[index], dtype="<u2").tobytes()
        path = folder / f"{prefix}_{slices - index:03d}.dcm"
        if index not in skip_slices:
            dataset.save_as(path, enforce_file_format=True)
            files.append(path)
    direction = np.stack([row, column, normal], axis=1)
    geometry = Geometry(
        shape=tuple(stored.shape), spacing=(slice_spacing, *pixel_spacing), origin=tuple(float(v) for v in origin),
        direction=tuple(direction.ravel().tolist()),
    )
    return files, geometry
