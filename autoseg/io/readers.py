"""Reading and writing images with their geometry.

One backend, SimpleITK, covers every format we support (NIfTI, NRRD, MHA/MHD, PNG, TIFF, BMP) and keeps
origin and direction exactly; numpy arrays come out with axes reversed relative to ITK (``z, y, x``).
2D natural images (PNG/TIFF/BMP) may hold several colour channels in one file: they are returned as that
many channels, which is the raw-format convention for RGB data.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from autoseg.errors import ImageReadError
from autoseg.fileio import atomic_path
from autoseg.io.geometry import Geometry

VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NATURAL_IMAGE_ENDINGS = (".png", ".tif", ".tiff", ".bmp")
SUPPORTED_ENDINGS = VOLUME_ENDINGS + NATURAL_IMAGE_ENDINGS
# Part of the message for a header with 0 mm spacing (verify reports it as a spacing problem).
ZERO_SPACING_MESSAGE = "header gives zero spacing along an axis"


def file_ending(path: str | os.PathLike) -> str | None:
    """The supported ending of ``path`` (``.nii.gz`` counts as one), or None."""
    name = Path(path).name.lower()
    for ending in sorted(SUPPORTED_ENDINGS, key=len, reverse=True):
        if name.endswith(ending):
            return ending
    return None


def is_natural_image(path: str | os.PathLike) -> bool:
    return file_ending(path) in NATURAL_IMAGE_ENDINGS


_NIFTI_ITEMSIZE = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                   1536: 16, 1792: 16, 2048: 32, 2304: 4}  # NIfTI datatype code -> bytes per voxel


def nifti_expected_size(header: bytes) -> int | None:
    """Bytes of an uncompressed NIfTI-1/-2 file as its header describes it (data offset + voxel data), or None
    when ``header`` (the file's first 540 bytes) is not a NIfTI header this function understands.

    NIfTI-1: sizeof_hdr 348, dim int16[8] at 40, datatype int16 at 70, vox_offset float32 at 108.
    NIfTI-2: sizeof_hdr 540, datatype int16 at 12, dim int64[8] at 16, vox_offset int64 at 168.
    """
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype = struct.unpack(order + "h", header[70:72])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            datatype = struct.unpack(order + "h", header[12:14])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = int(struct.unpack(order + "q", header[168:176])[0])
            break
    else:
        return None
    if datatype not in _NIFTI_ITEMSIZE or not 1 <= dims[0] <= 7:
        return None
    voxels = 1
    for extent in dims[1 : dims[0] + 1]:
        voxels *= max(int(extent), 1)
    return max(offset, 348) + voxels * _NIFTI_ITEMSIZE[datatype]


def check_not_truncated(path: Path) -> None:
    """Raise ImageReadError when a NIfTI file is shorter than its header says.

    ITK reads the missing part of a truncated ``.nii.gz`` as zeros without a word, which silently crops a
    case (and its label) away. A gzip stream ends with the uncompressed size modulo 2^32 (RFC 1952,
    ISIZE): compared with the size the header describes, that catches a cut-off file from two small reads,
    without decompressing it twice. An uncompressed ``.nii`` is simply compared with its file size.
    """
    ending = file_ending(path)
    if ending not in (".nii.gz", ".nii"):
        return
    try:
        if ending == ".nii":
            with open(path, "rb") as handle:
                header = handle.read(540)
            actual = path.stat().st_size
        else:
            with gzip.open(path, "rb") as handle:
                header = handle.read(540)
            with open(path, "rb") as handle:
                handle.seek(-4, os.SEEK_END)
                actual = struct.unpack("<I", handle.read(4))[0]
    except (OSError, EOFError, struct.error) as exc:
        raise ImageReadError(f"{path}: cannot be read ({exc}); the file is corrupt or truncated, copy it again") from exc
    expected = nifti_expected_size(header)
    if expected is None:
        return
    if ending == ".nii.gz":
        expected %= 2**32
        short = actual != expected
    else:
        short = actual < expected
    if short:
        raise ImageReadError(
            f"{path}: the file is truncated (its header describes {expected} bytes of image, the file holds "
            f"{'a different amount' if ending == '.nii.gz' else actual}); copy or export it again"
        )


def _read_sitk(path: Path) -> sitk.Image:
    if not path.is_file():
        raise ImageReadError(f"{path}: file does not exist")
    if file_ending(path) is None:
        raise ImageReadError(
            f"{path}: unsupported file ending; expected one of {', '.join(SUPPORTED_ENDINGS)}"
        )
    check_not_truncated(path)
    try:
        return _gray_palette_as_scalar(sitk.ReadImage(str(path)), path)
    except RuntimeError as exc:
        if "zero-valued spacing" in str(exc).lower():
            # ITK refuses to build an image whose header gives 0 mm voxel spacing along an axis.
            raise ImageReadError(
                f"{path}: {ZERO_SPACING_MESSAGE}; write the true voxel spacing (mm) into the file's header"
            ) from exc
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reader error"
        raise ImageReadError(f"{path}: cannot be read ({first_line}); the file is corrupt or not an image") from exc


def _gray_palette_as_scalar(image: sitk.Image, path: Path) -> sitk.Image:
    """ITK expands 8-bit palette BMPs (how it writes single-channel BMPs) to RGB. When the palette is gray
    (all three components equal) the file is single-channel: return one component so that grayscale images
    and label maps stay one channel."""
    if file_ending(path) != ".bmp" or image.GetNumberOfComponentsPerPixel() != 3:
        return image
    with open(path, "rb") as handle:
        header = handle.read(30)
    bits_per_pixel = int.from_bytes(header[28:30], "little") if len(header) >= 30 else 24  # BITMAPINFOHEADER
    if bits_per_pixel > 8:
        return image
    array = sitk.GetArrayViewFromImage(image)
    if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])):
        return image
    return sitk.VectorIndexSelectionCast(image, 0)


def _geometry_of(image: sitk.Image, natural: bool) -> Geometry:
    size = image.GetSize()  # ITK order x, y(, z)
    spacing = image.GetSpacing()
    origin = image.GetOrigin()
    direction = image.GetDirection()
    if natural and len(size) == 2:
        # PNG/BMP/TIFF carry no reliable physical spacing; treat pixels as 1 mm squares.
        spacing = (1.0, 1.0)
    return Geometry(
        shape=tuple(int(s) for s in reversed(size)),
        spacing=tuple(float(s) for s in reversed(spacing)),
        origin=tuple(float(v) for v in origin),
        direction=tuple(float(v) for v in direction),
    )


def read_channels(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read one file as ``[C, (Z,) Y, X]`` float32 plus its geometry. C > 1 only for colour images."""
    path = Path(path)
    image = _read_sitk(path)
    natural = is_natural_image(path)
    geometry = _geometry_of(image, natural)
    array = sitk.GetArrayFromImage(image)
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        array = np.moveaxis(array, -1, 0)  # vector pixels come last from SimpleITK
    else:
        array = array[None]
    if geometry.dims not in (2, 3):
        raise ImageReadError(
            f"{path}: has {geometry.dims} dimensions; autoseg reads 2D or 3D images "
            "(4D Decathlon files: run `autoseg convert-msd` first)"
        )
    return np.ascontiguousarray(array, dtype=np.float32), geometry


def read_image(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[np.ndarray, Geometry]:
    """Read a case's channel files (``<case>_0000``, ``_0001``, ...) into one ``[C, (Z,) Y, X]`` float32 array.

    All files must share shape and geometry; the first file's geometry is returned. A colour PNG counts as
    as many channels as it has colour components.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ImageReadError("no image files given")
    arrays, geometry = [], None
    for path in paths:
        array, geom = read_channels(path)
        if geometry is None:
            geometry = geom
        elif geom.shape != geometry.shape:
            raise ImageReadError(
                f"{path}: shape {geom.shape} differs from {Path(paths[0]).name} {geometry.shape}; "
                "all channels of a case must have the same grid"
            )
        arrays.append(array)
    assert geometry is not None
    return np.concatenate(arrays, axis=0), geometry


def read_segmentation(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read a label map as ``[(Z,) Y, X]`` (integer values kept exactly; dtype as stored, no channel axis)."""
    path = Path(path)
    image = _read_sitk(path)
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise ImageReadError(
            f"{path}: label file has {image.GetNumberOfComponentsPerPixel()} colour channels; "
            "a segmentation must be a single-channel integer image"
        )
    return sitk.GetArrayFromImage(image), _geometry_of(image, is_natural_image(path))


def _to_sitk(array: np.ndarray, geometry: Geometry, natural: bool) -> sitk.Image:
    if array.shape != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    image = sitk.GetImageFromArray(array)
    if not natural:
        image.SetSpacing(tuple(float(s) for s in reversed(geometry.spacing)))
        image.SetOrigin(geometry.origin)
        image.SetDirection(geometry.direction)
    return image


def write_segmentation(array: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> None:
    """Write a label map ``[(Z,) Y, X]`` with ``geometry``, atomically (temp file + rename).

    Values are stored as uint8 when they fit (uint16 otherwise); PNG/BMP label maps must fit in uint8/uint16.
    """
    path = Path(path)
    ending = file_ending(path)
    if ending is None:
        raise ImageReadError(f"{path}: unsupported file ending; expected one of {', '.join(SUPPORTED_ENDINGS)}")
    values = np.asarray(array)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"label values must lie in 0..65535, found {values.min()}..{values.max()}")
    dtype = np.uint8 if (values.size == 0 or values.max() < 256) else np.uint16
    stored = values.astype(dtype)
    image = _to_sitk(stored, geometry, ending in NATURAL_IMAGE_ENDINGS)
    with atomic_path(path, suffix=ending, verify=lambda tmp: _verify_written(tmp, stored)) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=ending in (".nii.gz", ".nrrd", ".mha"))


def _verify_written(path: Path, expected: np.ndarray) -> None:
    """Read ``path`` back and compare it with what was written: the writer does not report a full disk."""
    check_not_truncated(path)
    try:
        image = _gray_palette_as_scalar(sitk.ReadImage(str(path)), path)
    except RuntimeError as exc:
        raise ValueError(f"unreadable: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}") from None
    array = sitk.GetArrayViewFromImage(image)
    if array.shape == expected.shape and np.issubdtype(expected.dtype, np.floating):
        # ITK's NIfTI reader turns stored NaN/Inf into 0: judge the finite voxels only
        finite = np.isfinite(expected)
        same = np.array_equal(array[finite], expected[finite])
    else:
        same = np.array_equal(array, expected)
    if array.shape != expected.shape or not same:
        raise ValueError(f"read back {array.shape}, differing from the {expected.shape} array written")


def write_image(array: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> None:
    """Write one channel ``[(Z,) Y, X]`` (float or integer, dtype kept) with ``geometry``, atomically."""
    path = Path(path)
    ending = file_ending(path)
    if ending is None:
        raise ImageReadError(f"{path}: unsupported file ending; expected one of {', '.join(SUPPORTED_ENDINGS)}")
    values = np.asarray(array)
    image = _to_sitk(values, geometry, ending in NATURAL_IMAGE_ENDINGS)
    with atomic_path(path, suffix=ending, verify=lambda tmp: _verify_written(tmp, values)) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=ending in (".nii.gz", ".nrrd", ".mha"))
