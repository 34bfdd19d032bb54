"""DICOM series in, DICOM Segmentation (DICOM-SEG) out.

A DICOM series is a folder of single-slice files; its geometry is not in any one header but follows from all
of them together (DICOM PS3.3 C.7.6.2, Image Plane Module):

- ``ImageOrientationPatient`` gives the row and column direction cosines (LPS, like ITK); the slice normal is
  their cross product, and together they are the columns of the ITK direction matrix (x, y, z).
- Slices are sorted by the projection of ``ImagePositionPatient`` onto that normal, not by file name or
  ``InstanceNumber`` (scanners number slices head-to-feet as often as feet-to-head); the origin is the first
  slice's position after that sort, so the third direction column is always the normal itself.
- The spacing between slices comes from those projected positions. ``SliceThickness`` is the thickness of
  the reconstructed slab, which differs from the spacing in overlapping or gapped reconstructions.
- ``PixelSpacing`` is (distance between rows, distance between columns) = (y, x) in array order.
- Voxel values are the modality values (HU for CT): stored value x ``RescaleSlope`` + ``RescaleIntercept``.

Headers are read with pydicom; pixel data is decoded by SimpleITK's GDCM reader, file by file, because GDCM
decodes every compressed transfer syntax archives send (JPEG lossless, JPEG 2000, JPEG-LS, RLE) without
optional plugins, and it applies each file's own rescale slope/intercept. DICOM-SEG files are built with
highdicom. pydicom and highdicom are the optional ``autoseg[dicom]`` extra, imported only when needed.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from autoseg.errors import ConfigurationError, ImageReadError
from autoseg.fileio import atomic_path
from autoseg.io.geometry import Geometry
from autoseg.io.readers import file_ending

log = logging.getLogger(__name__)

DICOM_SEG_ENDING = ".dcm"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"  # DICOM PS3.4 B.5, Segmentation Storage SOP Class
# Orientations closer than this (direction cosines) are one orientation: DS values carry ~1e-6 rounding.
_ORIENTATION_TOLERANCE = 1e-4
# Slice spacing may vary by this fraction before the series counts as having a gap; IPP values are decimal
# strings of at most 16 characters, so rounding alone stays far below it.
_SPACING_TOLERANCE = 0.01
# Tags the discovery needs; reading only these keeps scanning thousands of files fast.
_DISCOVERY_TAGS = [
    "SeriesInstanceUID", "SeriesDescription", "SeriesNumber", "ImagePositionPatient",
    "ImageOrientationPatient", "Rows", "Columns", "Modality",
]


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as exc:
        raise ConfigurationError(
            "reading DICOM needs pydicom, which is not installed; install it with `pip install autoseg[dicom]`"
        ) from exc
    return pydicom


def _highdicom() -> Any:
    try:
        import highdicom
    except ImportError as exc:
        raise ConfigurationError(
            "writing DICOM-SEG needs highdicom, which is not installed; install it with `pip install autoseg[dicom]`"
        ) from exc
    return highdicom


def require_dicom_seg_writer() -> None:
    """Raise ConfigurationError (with the install command) unless pydicom and highdicom can be imported:
    called before a long prediction run, not after it."""
    _pydicom()
    _highdicom()


# ------------------------------------------------------------------------------------------- discovery
def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a DICOM Part 10 file: 128-byte preamble then ``DICM`` (PS3.10 7.1). Files
    without the preamble are not valid media files, and checking four bytes keeps discovery cheap."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


@dataclass(frozen=True)
class DicomSeries:
    """One image series found on disk. ``files`` are sorted along the slice normal, i.e. in the array's Z
    order; ``name`` is a readable, file-name-safe case id."""

    name: str
    folder: Path
    series_uid: str
    description: str
    files: tuple[Path, ...]


@dataclass(frozen=True)
class _Slice:
    path: Path
    position: np.ndarray  # ImagePositionPatient, mm (LPS)
    orientation: np.ndarray  # ImageOrientationPatient: row cosines then column cosines
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns) = (y, x)
    series_uid: str
    description: str
    series_number: str
    thickness: float | None
    spacing_between_slices: float | None
    frames: int


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _slice_of(path: Path, dataset: Any) -> _Slice | None:
    """The plane geometry of one header, or None when the file is no image slice (DICOMDIR, SR, RTSTRUCT,
    an existing SEG: none has a top-level ImagePositionPatient)."""
    position = dataset.get("ImagePositionPatient")
    orientation = dataset.get("ImageOrientationPatient")
    if not position or not orientation or len(position) != 3 or len(orientation) != 6:
        return None
    spacing = dataset.get("PixelSpacing") or dataset.get("ImagerPixelSpacing") or (1.0, 1.0)
    return _Slice(
        path=path,
        position=np.array([float(v) for v in position]),
        orientation=np.array([float(v) for v in orientation]),
        rows=int(dataset.get("Rows", 0) or 0),
        columns=int(dataset.get("Columns", 0) or 0),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        series_uid=str(dataset.get("SeriesInstanceUID", "") or ""),
        description=str(dataset.get("SeriesDescription", "") or ""),
        series_number=str(dataset.get("SeriesNumber", "") or ""),
        thickness=_float_or_none(dataset.get("SliceThickness")),
        spacing_between_slices=_float_or_none(dataset.get("SpacingBetweenSlices")),
        frames=int(dataset.get("NumberOfFrames", 1) or 1),
    )


def _read_slice(path: Path, tags: list[str] | None = None) -> _Slice | None:
    pydicom = _pydicom()
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{path}: DICOM header cannot be read ({exc}); the file is corrupt or truncated") from exc
    return _slice_of(path, dataset)


def _safe_name(text: str) -> str:
    """A case id usable as a file name: letters, digits, '.', '-', '_' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "series"


def _series_names(base: str | None, groups: dict[str, list[_Slice]]) -> dict[str, str]:
    """Readable names for the series of one folder: the folder name for a lone series; otherwise the
    SeriesDescription (+ SeriesNumber), falling back to the SeriesInstanceUID when those are not unique."""
    if len(groups) == 1 and base is not None:
        return {uid: base for uid in groups}
    names: dict[str, str] = {}
    for uid, slices in groups.items():
        first = slices[0]
        label = _safe_name(first.description) if first.description else "series"
        if first.series_number:
            label += f"_{_safe_name(first.series_number)}"
        names[uid] = label
    labels = list(names.values())
    for uid in names:
        if labels.count(names[uid]) > 1:
            names[uid] = _safe_name(uid) if uid else "no_series_uid"
    return {uid: f"{base}_{label}" if base else label for uid, label in names.items()}


def find_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Every image series under ``folder`` (the folder itself and its subfolders, recursively).

    Files of one folder are grouped by SeriesInstanceUID. A series is named after its folder, relative to
    ``folder`` with ``_`` between levels (``folder``'s own name when ``folder`` is itself the series); when one
    folder holds several series, each is named by its SeriesDescription and SeriesNumber. Non-DICOM files and
    DICOM files that are not image slices are ignored. Returns [] when there is no DICOM image.
    """
    root = Path(folder)
    found: list[DicomSeries] = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        here = Path(directory)
        slices = []
        for name in sorted(names):
            path = here / name
            # image files (NIfTI, PNG, ...) are other cases' business: no need to open them
            if name.startswith(".") or file_ending(path) is not None or not is_dicom_file(path):
                continue
            try:
                item = _read_slice(path, _DISCOVERY_TAGS + ["PixelSpacing", "NumberOfFrames"])
            except ImageReadError as exc:
                # one broken file must not stop the other series; its series then shows a gap when read
                log.warning("%s", exc)
                continue
            if item is None:
                log.debug("ignoring %s (DICOM, but not an image slice)", path)
                continue
            slices.append(item)
        if not slices:
            continue
        groups: dict[str, list[_Slice]] = {}
        for item in slices:
            groups.setdefault(item.series_uid, []).append(item)
        relative = here.relative_to(root)
        if relative.parts:
            base: str | None = _safe_name("_".join(relative.parts))
        else:
            base = _safe_name(root.resolve().name) if len(groups) == 1 else None
        names = _series_names(base, groups)
        for uid, group in groups.items():
            try:
                ordered = _sort_along_normal(group, here)
            except ImageReadError:
                ordered = group  # reported with its reason when the case is read
            found.append(DicomSeries(names[uid], here, uid, group[0].description, tuple(s.path for s in ordered)))
    return sorted(found, key=lambda series: series.name)


# -------------------------------------------------------------------------------------------- geometry
def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _sort_along_normal(slices: Sequence[_Slice], where: Path) -> list[_Slice]:
    first = slices[0]
    for item in slices[1:]:
        if np.abs(item.orientation - first.orientation).max() > _ORIENTATION_TOLERANCE:
            raise ImageReadError(
                f"{where}: slices {first.path.name} and {item.path.name} have different orientations; a series "
                "must be one stack of parallel slices: put each orientation (or localizer) in its own folder"
            )
    normal = np.cross(_unit(first.orientation[:3]), _unit(first.orientation[3:]))
    return sorted(slices, key=lambda s: float(np.dot(s.position, normal)))


def _series_geometry(slices: Sequence[_Slice], where: Path) -> tuple[list[_Slice], Geometry]:
    """Sort ``slices`` along their normal and derive the volume's geometry (module docstring)."""
    if not slices:
        raise ImageReadError(f"{where}: no DICOM image slices found")
    multi_frame = [s for s in slices if s.frames > 1]
    if multi_frame:
        raise ImageReadError(
            f"{multi_frame[0].path}: a multi-frame DICOM file ({multi_frame[0].frames} frames); autoseg reads "
            "series of single-slice files: convert it (e.g. to NIfTI with dcm2niix) first"
        )
    ordered = _sort_along_normal(slices, where)
    first = ordered[0]
    for item in ordered[1:]:
        if (item.rows, item.columns) != (first.rows, first.columns) or not np.allclose(
            item.pixel_spacing, first.pixel_spacing, rtol=1e-5
        ):
            raise ImageReadError(
                f"{where}: {item.path.name} is {item.rows}x{item.columns} at {item.pixel_spacing} mm but "
                f"{first.path.name} {first.rows}x{first.columns} at {first.pixel_spacing} mm; a series must share "
                "one slice grid: separate the series into their own folders"
            )
    row, column = _unit(first.orientation[:3]), _unit(first.orientation[3:])
    normal = np.cross(row, column)
    distances = np.array([float(np.dot(s.position, normal)) for s in ordered])
    if len(ordered) > 1:
        steps = np.diff(distances)
        if steps.min() <= 1e-6:
            at = int(np.argmin(steps))
            raise ImageReadError(
                f"{where}: {ordered[at].path.name} and {ordered[at + 1].path.name} lie at the same position; the "
                "folder mixes several acquisitions of one series: put each in its own folder"
            )
        slice_spacing = float((distances[-1] - distances[0]) / (len(ordered) - 1))
        if np.abs(steps - slice_spacing).max() > _SPACING_TOLERANCE * slice_spacing:
            at = int(np.argmax(np.abs(steps - slice_spacing)))
            raise ImageReadError(
                f"{where}: slice spacing is not uniform ({steps.min():.4g} to {steps.max():.4g} mm; e.g. between "
                f"{ordered[at].path.name} and {ordered[at + 1].path.name}); a slice is missing or the folder mixes "
                "acquisitions: export the complete series"
            )
        # slices stacked obliquely to their own plane (CT gantry tilt) cannot be described by an
        # orthonormal direction matrix; like ITK we keep the normal and say so rather than shear silently
        offsets = np.array([s.position - first.position for s in ordered])
        lateral = offsets - np.outer(distances - distances[0], normal)
        if np.linalg.norm(lateral, axis=1).max() > _SPACING_TOLERANCE * slice_spacing * len(ordered):
            log.warning("%s: slice positions are not perpendicular to the slices (gantry tilt?); the geometry "
                        "assumes perpendicular slices, physical positions away from the first slice are approximate",
                        where)
    else:
        slice_spacing = first.spacing_between_slices or first.thickness or 1.0
    direction = np.stack([row, column, normal], axis=1)  # columns: index axes x, y, z
    geometry = Geometry(
        shape=(len(ordered), first.rows, first.columns),
        spacing=(slice_spacing, first.pixel_spacing[0], first.pixel_spacing[1]),
        origin=tuple(float(v) for v in first.position),
        direction=tuple(float(v) for v in direction.ravel()),
    )
    return ordered, geometry


def read_dicom_geometry(files: Sequence[str | os.PathLike]) -> tuple[list[Path], Geometry]:
    """The files of one series sorted along the slice normal (array Z order) and the volume's geometry,
    from the headers alone."""
    paths = [Path(f) for f in files]
    where = paths[0].parent if paths else Path(".")
    slices = []
    for path in paths:
        item = _read_slice(path)
        if item is None:
            raise ImageReadError(f"{path}: DICOM file has no ImagePositionPatient/ImageOrientationPatient; it is not "
                                 "an image slice of a series: remove it from the series folder")
        slices.append(item)
    ordered, geometry = _series_geometry(slices, where)
    return [s.path for s in ordered], geometry


def _read_pixels(path: Path, rows: int, columns: int) -> np.ndarray:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reader error"
        raise ImageReadError(f"{path}: DICOM pixel data cannot be decoded ({message}); the file is corrupt") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{path}: a colour DICOM image ({image.GetNumberOfComponentsPerPixel()} samples per "
                             "pixel); autoseg reads grayscale series (CT, MR, PET)")
    values = sitk.GetArrayViewFromImage(image)
    if values.size != rows * columns:
        raise ImageReadError(f"{path}: pixel data holds {values.shape}, the header says {rows}x{columns}; the file is "
                             "corrupt")
    return np.asarray(values, dtype=np.float32).reshape(rows, columns)


def read_dicom_series(files: Sequence[str | os.PathLike]) -> tuple[np.ndarray, Geometry]:
    """Read one series as ``[1, Z, Y, X]`` float32 modality values (HU for CT) with its geometry.

    ``files`` may come in any order; they are sorted along the slice normal. Raises ImageReadError naming
    the folder when the files are not one regular stack of parallel slices.
    """
    ordered, geometry = read_dicom_geometry(files)
    _, rows, columns = geometry.shape
    volume = np.empty((1, *geometry.shape), dtype=np.float32)
    for index, path in enumerate(ordered):
        volume[0, index] = _read_pixels(path, rows, columns)
    return volume, geometry


# ----------------------------------------------------------------------------------------- DICOM-SEG
def _derived_uid(pydicom: Any, what: str, sources: Sequence[str]) -> str:
    # same source files -> same UID, so several SEGs written for one anonymised series stay together
    return str(pydicom.uid.generate_uid(entropy_srcs=[what, *sources]))


def _complete_uids(datasets: list[Any], pydicom: Any, where: Path) -> None:
    """Fill identifiers that anonymisation blanked and a SEG must reference (Type 1 in PS3.3).

    SOP Class/Instance UID are repeated in every file's meta header (PS3.10 7.1), so an empty one is copied
    from there and the SEG still points at the real instances. Study/Series/Frame of Reference UIDs have no
    second copy: they are derived deterministically from the instance UIDs, with a warning, since a viewer
    then cannot file the SEG under the original study.
    """
    for dataset in datasets:
        meta = getattr(dataset, "file_meta", None)
        if not dataset.get("SOPClassUID") and meta is not None and meta.get("MediaStorageSOPClassUID"):
            dataset.SOPClassUID = meta.MediaStorageSOPClassUID
        if not dataset.get("SOPInstanceUID") and meta is not None and meta.get("MediaStorageSOPInstanceUID"):
            dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        if not dataset.get("SOPInstanceUID"):
            raise ImageReadError(f"{where}: a file of the series has no SOPInstanceUID, in its header or meta header; "
                                 "a DICOM-SEG cannot reference it: use --output-format nifti")
    instances = [str(d.SOPInstanceUID) for d in datasets]
    derived = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(d.get(keyword, "") or "") for d in datasets}
        if len(values) > 1:
            raise ImageReadError(f"{where}: the slices have different {keyword}s; a DICOM-SEG references one "
                                 "series: put each series in its own folder")
        if values == {""}:
            uid = _derived_uid(pydicom, keyword, instances)
            for dataset in datasets:
                setattr(dataset, keyword, uid)
            derived.append(keyword)
    if derived:
        log.warning("%s: the series has no %s (anonymised?); the DICOM-SEG uses a UID derived from its instances",
                    where, ", ".join(derived))


def _segment_numbers(labels: Mapping[str, int]) -> list[tuple[int, int, str]]:
    """``(segment number, label value, name)`` for every foreground label, in label-value order. DICOM-SEG
    numbers segments 1, 2, ... without gaps (PS3.3 C.8.20.2); nnU-Net-style datasets number labels the same
    way, so segment number == label value there."""
    foreground = sorted((int(value), str(name)) for name, value in labels.items() if int(value) != 0)
    return [(number, value, name) for number, (value, name) in enumerate(foreground, start=1)]


def write_dicom_seg(
    segmentation: np.ndarray,
    geometry: Geometry,
    source_files: Sequence[str | os.PathLike],
    labels: Mapping[str, int],
    path: str | os.PathLike,
    series_description: str = "autoseg segmentation",
    software_version: str | None = None,
) -> None:
    """Write a label map ``[Z, Y, X]`` on the grid of the series ``source_files`` as a binary DICOM-SEG.

    ``labels``: name -> value as in dataset.json (background 0 is not a segment). Each foreground label
    becomes one segment, its name the SegmentLabel; segment numbers follow the label values in order. Frames
    reference their source slices (highdicom fills ReferencedSeriesSequence and per-frame source images);
    frames with no voxel of a segment are left out. ``geometry`` must be the series' own (what
    :func:`read_dicom_series` returned), which guarantees frame ``z`` lands on the ``z``-th slice along the
    normal. Written atomically and read back with pydicom before it replaces ``path``.
    """
    pydicom = _pydicom()
    highdicom = _highdicom()
    from pydicom.sr.codedict import codes

    target = Path(path)
    # headers are read once: for the geometry check and as the source datasets highdicom references
    paths = [Path(f) for f in source_files]
    where = paths[0].parent if paths else Path(".")
    headers = {}
    for source in paths:
        try:
            headers[source] = pydicom.dcmread(source, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise ImageReadError(f"{source}: DICOM header cannot be read ({exc}); the file is corrupt") from exc
    slices = [_slice_of(source, dataset) for source, dataset in headers.items()]
    if any(item is None for item in slices):
        raise ImageReadError(f"{where}: a file of the series is not an image slice; a DICOM-SEG references slices")
    ordered, series_geometry = _series_geometry(slices, where)  # type: ignore[arg-type]
    values = np.asarray(segmentation)
    if tuple(values.shape) != tuple(series_geometry.shape) or geometry.mismatch(series_geometry):
        problems = geometry.mismatch(series_geometry) or [f"shape {values.shape} vs {series_geometry.shape}"]
        raise ValueError(f"segmentation does not lie on the grid of the series in {where}: {'; '.join(problems)}")
    segments = _segment_numbers(labels)
    known = {value for _, value, _ in segments} | {0}
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"a label map must hold integers, found {values.dtype}")
    if np.issubdtype(values.dtype, np.unsignedinteger):
        present = set(np.flatnonzero(np.bincount(values.ravel())).tolist())  # one pass, no sort of the volume
    else:
        present = set(np.unique(values).tolist())
    if not present <= known:
        raise ValueError(f"label values {sorted(present - known)} are not in the label names {dict(labels)}")
    lookup = np.zeros(max(known) + 1, dtype=np.uint16 if len(segments) > 255 else np.uint8)
    for number, value, _ in segments:
        lookup[value] = number
    numbered = lookup[values]  # indexing with the label dtype itself: no int64 copy of the volume

    datasets = [headers[item.path] for item in ordered]
    _complete_uids(datasets, pydicom, where)
    if software_version is None:
        from autoseg import __version__ as software_version
    algorithm = highdicom.AlgorithmIdentificationSequence(
        name="autoseg", family=codes.DCM.ArtificialIntelligence, version=str(software_version)
    )
    # dataset.json names are free text with no coded meaning; "Tissue" is the generic SNOMED CT category/type,
    # and viewers show the SegmentLabel (the name) to the reader.
    descriptions = [
        highdicom.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        )
        for number, _, name in segments
    ]
    seg = highdicom.seg.Segmentation(
        source_images=datasets,
        pixel_array=numbered,
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=1,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
        manufacturer="autoseg",
        manufacturer_model_name="autoseg",
        software_versions=str(software_version),
        device_serial_number="1",
        content_description=series_description[:64],
    )
    seg.SeriesDescription = series_description[:64]
    frames, segment_count = int(seg.NumberOfFrames), len(descriptions)

    def verify(tmp: Path) -> None:
        written = pydicom.dcmread(tmp)
        if str(written.SOPClassUID) != SEGMENTATION_STORAGE:
            raise ValueError(f"SOP class {written.SOPClassUID}, not Segmentation Storage")
        if int(written.NumberOfFrames) != frames or len(written.SegmentSequence) != segment_count:
            raise ValueError(f"{written.NumberOfFrames} frames / {len(written.SegmentSequence)} segments, "
                             f"expected {frames} / {segment_count}")
        bits = frames * int(written.Rows) * int(written.Columns)  # BINARY: one bit per pixel, packed
        if len(written.PixelData) < (bits + 7) // 8:
            raise ValueError(f"pixel data holds {len(written.PixelData)} bytes, expected {(bits + 7) // 8}")

    with atomic_path(target, suffix=DICOM_SEG_ENDING, verify=verify) as tmp:
        seg.save_as(tmp)
