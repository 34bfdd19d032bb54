"""Image I/O keeps data and geometry exactly, per supported format."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.errors import ImageReadError
from autoseg.io import Geometry, file_ending, read_channels, read_image, read_segmentation, write_image, write_segmentation

VOLUME_FORMATS = [".nii.gz", ".nii", ".nrrd", ".mha"]
NATURAL_FORMATS = [".png", ".tif", ".bmp"]


def _oblique_geometry(shape: tuple[int, ...]) -> Geometry:
    """Anisotropic spacing, a non-zero origin and a rotated (non-identity) direction in 3D."""
    angle = 0.4
    c, s = np.cos(angle), np.sin(angle)
    # rotation about z then a flip of the third axis: orthonormal, non-identity, determinant -1
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]])
    return Geometry(shape=shape, spacing=(3.0, 0.75, 0.5), origin=(-120.5, 33.25, 7.125),
                    direction=tuple(direction.ravel().tolist()))


def _assert_same_geometry(found: Geometry, expected: Geometry, atol: float = 1e-5) -> None:
    assert found.shape == expected.shape
    np.testing.assert_allclose(found.spacing, expected.spacing, rtol=0, atol=atol)
    np.testing.assert_allclose(found.origin, expected.origin, rtol=0, atol=atol)
    np.testing.assert_allclose(found.direction, expected.direction, rtol=0, atol=atol)


@pytest.mark.parametrize("ending", VOLUME_FORMATS)
def test_volume_round_trip_keeps_values_and_geometry(tmp_path: Path, ending: str) -> None:
    rng = np.random.default_rng(0)
    shape = (5, 7, 9)  # distinct sizes: a transposed axis order would show
    geometry = _oblique_geometry(shape)
    image = rng.normal(100.0, 30.0, shape).astype(np.float32)
    path = tmp_path / f"case_0000{ending}"
    write_image(image, geometry, path)

    array, found = read_image([path])
    assert array.shape == (1, *shape) and array.dtype == np.float32
    np.testing.assert_array_equal(array[0], image)
    _assert_same_geometry(found, geometry)
    assert file_ending(path) == ending
    assert not list(tmp_path.glob(".*partial*")), "atomic write left a temporary file"


@pytest.mark.parametrize("ending", VOLUME_FORMATS)
def test_segmentation_round_trip_keeps_labels_and_geometry(tmp_path: Path, ending: str) -> None:
    shape = (4, 6, 8)
    geometry = _oblique_geometry(shape)
    label = np.zeros(shape, np.uint8)
    label[1:3, 2:5, 3:7] = 1
    label[2, 4, 6] = 2
    path = tmp_path / f"case{ending}"
    write_segmentation(label, geometry, path)
    found_label, found = read_segmentation(path)
    np.testing.assert_array_equal(found_label, label)
    assert np.issubdtype(found_label.dtype, np.integer)
    _assert_same_geometry(found, geometry)


@pytest.mark.parametrize("ending", NATURAL_FORMATS)
def test_natural_image_round_trip(tmp_path: Path, ending: str) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (13, 17)).astype(np.uint8)  # rows != columns: axis order shows
    geometry = Geometry(shape=(13, 17), spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0))
    path = tmp_path / f"img_0000{ending}"
    write_image(image, geometry, path)
    array, found = read_image(path)
    assert array.shape == (1, 13, 17)
    np.testing.assert_array_equal(array[0], image.astype(np.float32))
    assert found.shape == (13, 17) and found.spacing == (1.0, 1.0)

    label = (image > 128).astype(np.uint8)
    write_segmentation(label, geometry, tmp_path / f"img{ending}")
    found_label, _ = read_segmentation(tmp_path / f"img{ending}")
    np.testing.assert_array_equal(found_label, label)


def test_rgb_png_reads_as_three_channels(tmp_path: Path) -> None:
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    rgb[2, 3] = (200, 100, 50)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "c_0000.png"))
    array, geometry = read_channels(tmp_path / "c_0000.png")
    assert array.shape == (3, 6, 8) and geometry.shape == (6, 8)
    assert array[:, 0, 0].tolist() == [10, 20, 30]
    assert array[:, 2, 3].tolist() == [200, 100, 50]
    with pytest.raises(ImageReadError, match="colour channels"):
        read_segmentation(tmp_path / "c_0000.png")


def test_channels_with_different_shapes_are_refused(tmp_path: Path) -> None:
    write_image(np.zeros((4, 5, 6), np.float32), _oblique_geometry((4, 5, 6)), tmp_path / "a_0000.nii.gz")
    write_image(np.zeros((4, 5, 7), np.float32), _oblique_geometry((4, 5, 7)), tmp_path / "a_0001.nii.gz")
    with pytest.raises(ImageReadError, match="a_0001.nii.gz"):
        read_image([tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"])


def test_gray_palette_bmp_reads_as_one_channel_but_colour_bmp_keeps_three(tmp_path: Path) -> None:
    colour = np.zeros((4, 5, 3), np.uint8)
    colour[..., 0] = 255  # pure red: components differ
    sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(tmp_path / "red_0000.bmp"))
    array, _ = read_channels(tmp_path / "red_0000.bmp")
    assert array.shape == (3, 4, 5) and array[0].max() == 255 and array[1].max() == 0


def test_corrupt_and_unsupported_files_raise_read_errors(tmp_path: Path) -> None:
    corrupt = tmp_path / "bad_0000.nii.gz"
    corrupt.write_bytes(b"this is not a nifti file")
    with pytest.raises(ImageReadError, match="bad_0000.nii.gz"):
        read_image(corrupt)
    with pytest.raises(ImageReadError, match="unsupported file ending"):
        read_channels(_touch(tmp_path / "y.jpg"))
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "missing_0000.nii.gz")


def _touch(path: Path) -> Path:
    path.write_bytes(b"\0")
    return path


def write_zero_spacing_nrrd(path: Path, shape_xyz: tuple[int, int, int] = (6, 5, 4)) -> None:
    """A raw NRRD whose first axis has zero length in its header (ITK refuses such images)."""
    header = (
        "NRRD0004\ntype: float\ndimension: 3\n"
        f"sizes: {shape_xyz[0]} {shape_xyz[1]} {shape_xyz[2]}\n"
        "space dimension: 3\nspace directions: (0,0,0) (0,1,0) (0,0,1)\nencoding: raw\nendian: little\n\n"
    )
    path.write_bytes(header.encode() + np.zeros(shape_xyz[::-1], np.float32).tobytes())


def test_zero_spacing_gets_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "z_0000.nrrd"
    write_zero_spacing_nrrd(path)
    with pytest.raises(ImageReadError, match="zero spacing"):
        read_image(path)


def _write_volume(path: Path, shape=(20, 30, 40)) -> np.ndarray:
    array = (np.arange(np.prod(shape)) % 251).reshape(shape).astype(np.int16)
    write_image(array, Geometry(shape=shape, spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel())), path)
    return array


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_truncated_nifti_is_refused_instead_of_read_as_zeros(tmp_path: Path, ending: str) -> None:
    path = tmp_path / f"case_0000{ending}"
    _write_volume(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: int(len(whole) * 0.63)])  # a copy cut off at 63 %
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path)
    path.write_bytes(whole)  # the intact file still reads
    assert read_image(path)[0].shape == (1, 20, 30, 40)


def test_a_write_that_does_not_read_back_is_refused_and_replaces_nothing(tmp_path: Path, monkeypatch) -> None:
    """A full disk: SimpleITK's writer truncates the file and returns without an error."""
    from autoseg.errors import WriteError

    target = tmp_path / "seg.nii.gz"
    geometry = Geometry(shape=(20, 30, 40), spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    old = np.zeros(geometry.shape, np.uint8)
    write_segmentation(old, geometry, target)
    before = target.read_bytes()
    real_write = sitk.WriteImage

    def write_then_lose_the_end(image, name, *args, **kwargs):
        real_write(image, name, *args, **kwargs)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[: len(data) // 3])

    monkeypatch.setattr(sitk, "WriteImage", write_then_lose_the_end)
    new = np.ones(geometry.shape, np.uint8)
    with pytest.raises(WriteError, match="does not read back"):
        write_segmentation(new, geometry, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]  # no temporary left behind
