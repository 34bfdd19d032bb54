"""DICOM series reading (geometry from the slice positions, modality values) and DICOM-SEG writing.

Two sources: small synthetic series written with pydicom in tmp_path (known geometry, oblique, values to
the unit), and the real CT series of ../shared/datasets/DICOM_CT_example with its 31-structure label map
(tests marked ``realdata``, skipped when the folder is absent).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
highdicom = pytest.importorskip("highdicom")
sitk = pytest.importorskip("SimpleITK")

from autoseg.errors import ConfigurationError, ImageReadError  # noqa: E402
from autoseg.io import (  # noqa: E402
    Geometry,
    find_dicom_series,
    labels_onto_geometry,
    read_dicom_geometry,
    read_dicom_series,
    read_segmentation,
    write_dicom_seg,
)

from tests.io.dicom_series import EXAMPLE, oblique_orientation, write_series  # noqa: E402

needs_example = pytest.mark.skipif(not (EXAMPLE / "series").is_dir(), reason=f"{EXAMPLE} is not available")


def _stored(shape=(5, 6, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3000, size=shape).astype(np.uint16)


def _simpleitk_series(folder: Path) -> tuple[np.ndarray, Geometry]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    geometry = Geometry(
        shape=tuple(reversed(image.GetSize())), spacing=tuple(reversed(image.GetSpacing())),
        origin=image.GetOrigin(), direction=image.GetDirection(),
    )
    return sitk.GetArrayFromImage(image), geometry


# --------------------------------------------------------------------------------- synthetic series
def test_oblique_series_geometry_from_positions_and_values_in_hu(tmp_path: Path) -> None:
    stored = _stored()
    files, expected = write_series(tmp_path / "s", stored, orientation=oblique_orientation(), slope=2.0,
                                   intercept=-1000.0)
    # the files in reverse order: the reader must sort along the normal itself
    volume, geometry = read_dicom_series(list(reversed(files)))
    assert geometry.mismatch(expected, tolerance=1e-6) == []
    assert geometry.spacing[0] == pytest.approx(2.5)  # from the positions, not SliceThickness (5.0)
    assert geometry.spacing[1:] == (0.7, 0.9)  # PixelSpacing is (rows, columns) = (y, x)
    assert volume.shape == (1, *stored.shape) and volume.dtype == np.float32
    np.testing.assert_array_equal(volume[0], stored.astype(np.float32) * 2.0 - 1000.0)
    # independent reading of the values: pydicom's own decoding plus the rescale, slice by slice
    for z, path in enumerate(files):
        dataset = pydicom.dcmread(path)
        hounsfield = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        np.testing.assert_array_equal(volume[0, z], hounsfield)


def test_oblique_series_matches_simpleitk_series_reader(tmp_path: Path) -> None:
    stored = _stored((4, 5, 6), seed=1)
    write_series(tmp_path / "s", stored, orientation=oblique_orientation(35.0), slope=1.0, intercept=-1024.0)
    files = sorted((tmp_path / "s").iterdir())
    volume, geometry = read_dicom_series(files)
    reference, reference_geometry = _simpleitk_series(tmp_path / "s")
    assert geometry.mismatch(reference_geometry, tolerance=1e-5) == []
    np.testing.assert_array_equal(volume[0], reference)


def test_missing_slice_mixed_orientation_and_duplicates_are_errors(tmp_path: Path) -> None:
    stored = _stored()
    write_series(tmp_path / "gap", stored, skip_slices=[2])
    with pytest.raises(ImageReadError, match=r"gap.*not uniform.*slice is missing"):
        read_dicom_series(sorted((tmp_path / "gap").iterdir()))

    files, _ = write_series(tmp_path / "mixed", stored)
    localizer, _ = write_series(tmp_path / "other", stored[:1], orientation=oblique_orientation())
    with pytest.raises(ImageReadError, match="different orientations"):
        read_dicom_series([*files, *localizer])

    again, _ = write_series(tmp_path / "again", stored)
    with pytest.raises(ImageReadError, match="same position"):
        read_dicom_series([*files, again[0]])


def test_gantry_tilt_is_reported_and_the_spacing_is_along_the_normal(tmp_path: Path, caplog) -> None:
    files, _ = write_series(tmp_path / "tilt", _stored(), slice_spacing=2.5, tilt_mm_per_slice=0.8)
    _, geometry = read_dicom_series(files)
    assert geometry.spacing[0] == pytest.approx(2.5)
    assert "not perpendicular to the slices (gantry tilt?)" in caplog.text
    caplog.clear()
    straight, _ = write_series(tmp_path / "straight", _stored())
    read_dicom_series(straight)
    assert "gantry tilt" not in caplog.text


def test_single_slice_uses_the_header_spacing(tmp_path: Path) -> None:
    files, _ = write_series(tmp_path / "one", _stored((1, 4, 4)), slice_spacing=3.0)
    _, geometry = read_dicom_series(files)
    assert geometry.shape == (1, 4, 4)
    assert geometry.spacing[0] == pytest.approx(6.0)  # SliceThickness: no second slice to measure from


def test_discovery_names_series_by_folder_or_description(tmp_path: Path) -> None:
    stored = _stored((3, 4, 4))
    write_series(tmp_path / "root" / "patient_a", stored)
    write_series(tmp_path / "root" / "patient_b" / "ct", stored)
    # two series in one folder, told apart by SeriesInstanceUID and named by SeriesDescription + number
    write_series(tmp_path / "root" / "mixed", stored, description="CT arterial", series_number=4)
    write_series(tmp_path / "root" / "mixed", stored[:2], description="CT venous", series_number=5, prefix="venous")
    (tmp_path / "root" / "notes.txt").write_text("not DICOM")
    series = find_dicom_series(tmp_path / "root")
    names = {s.name: len(s.files) for s in series}
    assert set(names) == {"patient_a", "patient_b_ct", "mixed_CT_arterial_4", "mixed_CT_venous_5"}
    assert names["patient_a"] == 3 and names["patient_b_ct"] == 3
    # files come sorted along the normal: Z order, whatever the names
    for item in series:
        ordered, _ = read_dicom_geometry(item.files)
        assert list(item.files) == ordered
    # a folder that is itself one series is named after itself
    (only,) = find_dicom_series(tmp_path / "root" / "patient_a")
    assert only.name == "patient_a" and len(only.files) == 3
    assert find_dicom_series(tmp_path / "root" / "patient_b" / "nothing") == []


def test_without_the_dicom_extra_the_error_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, geometry = write_series(tmp_path / "s", _stored((2, 3, 3)))
    monkeypatch.setitem(sys.modules, "highdicom", None)  # None in sys.modules: the import fails
    with pytest.raises(ConfigurationError, match=r"highdicom, which is not installed.*pip install autoseg\[dicom\]"):
        write_dicom_seg(np.zeros(geometry.shape, np.uint8), geometry, files, {"background": 0}, tmp_path / "x.dcm")
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ConfigurationError, match=r"pydicom, which is not installed.*pip install autoseg\[dicom\]"):
        find_dicom_series(tmp_path / "s")


def test_dicom_seg_of_synthetic_series_references_it(tmp_path: Path) -> None:
    stored = _stored((4, 6, 5))
    files, geometry = write_series(tmp_path / "s", stored, orientation=oblique_orientation())
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    labels[1, 2:4, 1:3] = 1
    labels[3, 0:2, :] = 2
    target = tmp_path / "out" / "case.dcm"
    write_dicom_seg(labels, geometry, files, {"background": 0, "liver": 1, "spleen": 2}, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["case.dcm"]  # no temporary file left
    source = pydicom.dcmread(files[0])
    seg = highdicom.seg.segread(target)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "liver"), (2, "spleen")]
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in files]
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    np.testing.assert_array_equal(back, labels)
    # only frames holding a segment are stored: slice 1 (liver) and slice 3 (spleen)
    assert int(seg.NumberOfFrames) == 2

    shifted = Geometry(geometry.shape, geometry.spacing, (0.0, 0.0, 0.0), geometry.direction)
    with pytest.raises(ValueError, match="grid of the series"):
        write_dicom_seg(labels, shifted, files, {"background": 0, "liver": 1, "spleen": 2}, tmp_path / "x.dcm")
    with pytest.raises(ValueError, match=r"label values \[2\]"):
        write_dicom_seg(labels, geometry, files, {"background": 0, "liver": 1}, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


# ------------------------------------------------------------------------------------ regridding
def test_labels_onto_geometry_undoes_flips_and_permutations() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(3, 4, 5)).astype(np.uint8)
    # spacing in array order (z, y, x); origin in physical order (x, y, z)
    grid = Geometry((3, 4, 5), (2.0, 0.5, 0.8), (10.0, -4.0, 7.0), tuple(np.eye(3).ravel()))
    # the same voxels stored with y flipped: origin at the far y end, y cosine negated
    flipped = Geometry((3, 4, 5), (2.0, 0.5, 0.8), (10.0, -4.0 + 3 * 0.5, 7.0),
                       (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    np.testing.assert_array_equal(labels_onto_geometry(np.flip(labels, 1), flipped, grid), labels)
    # x and z swapped in storage (array axes transposed, direction columns swapped)
    swapped = Geometry((5, 4, 3), (0.8, 0.5, 2.0), grid.origin, (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0))
    np.testing.assert_array_equal(labels_onto_geometry(labels.transpose(2, 1, 0), swapped, grid), labels)
    # a target reaching beyond the source: outside is background, inside the labels land shifted
    wider = Geometry((3, 4, 7), (2.0, 0.5, 0.8), (10.0 - 2 * 0.8, -4.0, 7.0), grid.direction)
    mapped = labels_onto_geometry(labels, grid, wider)
    np.testing.assert_array_equal(mapped[..., 2:], labels)
    assert not mapped[..., :2].any()
    # nearest neighbour at double resolution: every voxel repeats (its centre is 0.25 voxel from the target's)
    fine = Geometry((3, 4, 10), (2.0, 0.5, 0.4), (10.0 - 0.2, -4.0, 7.0), grid.direction)
    np.testing.assert_array_equal(labels_onto_geometry(labels, grid, fine), np.repeat(labels, 2, axis=2))


# ------------------------------------------------------------------------------ the real CT series
@pytest.mark.realdata
@needs_example
def test_example_series_matches_simpleitk_series_reader() -> None:
    (series,) = find_dicom_series(EXAMPLE / "series")
    volume, geometry = read_dicom_series(series.files)
    reference, reference_geometry = _simpleitk_series(EXAMPLE / "series")
    assert geometry.shape == reference_geometry.shape == (20, 512, 512)
    assert geometry.mismatch(reference_geometry, tolerance=1e-6) == []
    np.testing.assert_allclose(geometry.spacing, (2.0, 0.9765625, 0.9765625))
    np.testing.assert_array_equal(volume[0], reference)
    assert volume.min() == -1024.0  # stored 0 with intercept -1024: values are HU


@pytest.fixture(scope="module")
def example_labels_on_series() -> tuple[np.ndarray, np.ndarray, Geometry, list[Path]]:
    if not (EXAMPLE / "series").is_dir():
        pytest.skip(f"{EXAMPLE} is not available")
    (series,) = find_dicom_series(EXAMPLE / "series")
    files, geometry = read_dicom_geometry(series.files)
    raw, raw_geometry = read_segmentation(EXAMPLE / "reference_segmentation.nii.gz")
    return raw, labels_onto_geometry(raw, raw_geometry, geometry), geometry, files


@pytest.mark.realdata
def test_example_labels_map_onto_the_series_grid(example_labels_on_series) -> None:
    raw, mapped, geometry, _ = example_labels_on_series
    raw_geometry = read_segmentation(EXAMPLE / "reference_segmentation.nii.gz")[1]
    assert raw_geometry.direction[4] == -1.0 and geometry.direction[4] == 1.0  # stored with y flipped
    values, counts = np.unique(raw, return_counts=True)
    mapped_values, mapped_counts = np.unique(mapped, return_counts=True)
    assert len(values) - 1 == 31  # 31 structures and background
    np.testing.assert_array_equal(mapped_values, values)
    np.testing.assert_array_equal(mapped_counts, counts)  # the grids coincide up to the flip: exact
    np.testing.assert_array_equal(mapped, np.flip(raw, axis=1))
    assert not np.array_equal(mapped, raw)


@pytest.mark.realdata
def test_example_dicom_seg_round_trip(example_labels_on_series, tmp_path: Path, caplog) -> None:
    _, mapped, geometry, files = example_labels_on_series
    present = [int(v) for v in np.unique(mapped) if v]
    names = {"background": 0, **{f"structure_{value}": value for value in present}}
    target = tmp_path / "example.dcm"
    write_dicom_seg(mapped, geometry, files, names, target)
    # the example is anonymised without Study/Series UIDs: derived ones, and a warning says so
    assert "no StudyInstanceUID, SeriesInstanceUID" in caplog.text

    seg = highdicom.seg.segread(target)
    assert len(seg.SegmentSequence) == 31
    # segment numbers 1..31 follow the label values in order; the names travel as SegmentLabel
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [
        (number, f"structure_{value}") for number, value in enumerate(present, start=1)
    ]
    instance_uids = [str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
                     for p in files]
    referenced = [item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(instance_uids)
    # every frame sits on its source slice: same position, and it names that slice as its source
    positions = {uid: [float(v) for v in pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient]
                 for uid, p in zip(instance_uids, files)}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, positions[source_uid], atol=1e-4)
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=instance_uids, combine_segments=True,
                                             skip_overlap_checks=True)
    lookup = np.zeros(max(present) + 1, dtype=np.uint8)
    lookup[present] = np.arange(1, len(present) + 1)
    np.testing.assert_array_equal(back, lookup[mapped])
