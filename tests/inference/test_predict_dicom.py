"""`autoseg predict` on DICOM series: discovery of series folders, NIfTI out with the series' geometry, and
DICOM-SEG out referencing the series (``--output-format dicom-seg``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pydicom = pytest.importorskip("pydicom")
highdicom = pytest.importorskip("highdicom")

from autoseg.errors import ConfigurationError, PredictionError  # noqa: E402
from autoseg.inference import Predictor, predict  # noqa: E402
from autoseg.inference.predict import find_input_cases  # noqa: E402
from autoseg.io import Geometry, read_segmentation, write_image  # noqa: E402

from tests.inference.conftest import make_plans, write_fake_checkpoint  # noqa: E402
from tests.io.dicom_series import EXAMPLE, oblique_orientation, write_series  # noqa: E402


class ThresholdNetwork(nn.Module):
    """Class 1 where the intensity (HU) > 100, class 2 where > 200: steep logits, so the argmax is exact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :1]
        return torch.cat([torch.zeros_like(v), (v - 100.0), 2 * (v - 150.0)], dim=1)


def _known_series(folder: Path, shape=(5, 12, 10), pixel_spacing=(0.7, 0.9), slice_spacing=2.5, seed=0, **kwargs):
    """A series whose HU values keep >= 20 HU from the thresholds; returns (files, geometry, HU volume)."""
    rng = np.random.default_rng(seed)
    hounsfield = rng.choice(np.array([20.0, 60.0, 140.0, 170.0, 240.0, 300.0]), size=shape)
    stored = ((hounsfield + 1000.0) / 2.0).astype(np.uint16)  # slope 2, intercept -1000
    files, geometry = write_series(folder, stored, pixel_spacing=pixel_spacing, slice_spacing=slice_spacing,
                                   slope=2.0, intercept=-1000.0, **kwargs)
    return files, geometry, hounsfield


def _expected(hounsfield: np.ndarray) -> np.ndarray:
    return np.where(hounsfield > 200, 2, np.where(hounsfield > 100, 1, 0)).astype(np.uint8)


def _predictor(spacing=(2.5, 0.7, 0.9)) -> Predictor:
    plans = make_plans(3, patch=(8, 16, 16), spacing=spacing)
    configuration = next(iter(plans.configurations.values()))
    return Predictor([ThresholdNetwork()], plans, configuration, 1, device="cpu", mirror=False)


# ------------------------------------------------------------------------------------------ discovery
@pytest.mark.realdata
@pytest.mark.skipif(not (EXAMPLE / "series").is_dir(), reason=f"{EXAMPLE} is not available")
def test_discovery_of_one_series_and_of_series_subfolders(tmp_path: Path) -> None:
    (case,) = find_input_cases(EXAMPLE / "series")
    assert (case.case_id, len(case.files), case.dicom, case.ending, case.problem) == ("series", 20, True, ".nii.gz",
                                                                                      None)
    # two series subfolders (three consecutive slices of the example each, linked): one case per subfolder
    for name in ("patient_a", "patient_b"):
        (tmp_path / "in" / name).mkdir(parents=True)
        for source in case.files[:3]:
            (tmp_path / "in" / name / source.name).symlink_to(source)
    cases = find_input_cases(tmp_path / "in")
    assert [(c.case_id, len(c.files), c.dicom) for c in cases] == [("patient_a", 3, True), ("patient_b", 3, True)]
    # files travel in Z order: the first is the lowest slice along the normal, as read_dicom_series puts it
    for found in cases:
        assert [f.name for f in found.files] == [f.name for f in case.files[:3]]


def test_discovery_splits_one_folder_by_series_uid_and_rejects_non_dicom(tmp_path: Path) -> None:
    _known_series(tmp_path / "in", description="CT arterial", series_number=2, prefix="a")
    _known_series(tmp_path / "in", description="CT venous", series_number=3, prefix="v")
    cases = find_input_cases(tmp_path / "in")
    assert [(c.case_id, len(c.files)) for c in cases] == [("CT_arterial_2", 5), ("CT_venous_3", 5)]

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "IM0001").write_bytes(b"\x00" * 200)  # no DICM magic
    (tmp_path / "text" / "notes.txt").write_text("hello")
    with pytest.raises(PredictionError, match=r"text: no images found .* and no DICOM series"):
        find_input_cases(tmp_path / "text")


# ----------------------------------------------------------------------------------------- prediction
def test_series_predicted_to_nifti_with_the_series_geometry(tmp_path: Path, identity_preprocessing: None) -> None:
    _, geometry, hounsfield = _known_series(tmp_path / "in" / "ct1", orientation=oblique_orientation())
    report = predict(tmp_path / "in", tmp_path / "out", "unused", "3d_fullres", predictor=_predictor())
    assert report.ok, report.failures
    segmentation, written = read_segmentation(tmp_path / "out" / "ct1.nii.gz")
    assert written.mismatch(geometry, tolerance=1e-5) == []
    np.testing.assert_array_equal(segmentation, _expected(hounsfield))


def test_series_predicted_to_dicom_seg(tmp_path: Path, identity_preprocessing: None) -> None:
    files, geometry, hounsfield = _known_series(tmp_path / "in" / "ct1")
    report = predict(tmp_path / "in", tmp_path / "out", "unused", "3d_fullres", predictor=_predictor(),
                     output_format="dicom-seg")
    assert report.ok, report.failures
    assert report.written == [tmp_path / "out" / "ct1.dcm"]
    seg = highdicom.seg.segread(tmp_path / "out" / "ct1.dcm")
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "object"), (2, "satellite")]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(files[0]).SeriesInstanceUID
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in files]
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    np.testing.assert_array_equal(back, _expected(hounsfield))


def test_dicom_seg_needs_dicom_input(tmp_path: Path, identity_preprocessing: None) -> None:
    nifti = tmp_path / "in" / "plain_0000.nii.gz"
    write_image(np.full((5, 12, 10), 150.0, dtype=np.float32),
                Geometry((5, 12, 10), (2.5, 0.7, 0.9), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())), nifti)
    with pytest.raises(ConfigurationError, match="needs DICOM series as input"):
        predict(tmp_path / "in", tmp_path / "out", "unused", "3d_fullres", predictor=_predictor(),
                output_format="dicom-seg")
    # next to a series, the image file is reported as failed and the series is still written
    _known_series(tmp_path / "in" / "ct1")
    report = predict(tmp_path / "in", tmp_path / "out", "unused", "3d_fullres", predictor=_predictor(),
                     output_format="dicom-seg")
    assert not report.ok
    assert [case for case, _ in report.failures] == ["plain"]
    assert "not a DICOM series" in report.failures[0][1]
    assert report.written == [tmp_path / "out" / "ct1.dcm"]
    with pytest.raises(ConfigurationError, match="--output-format dicom: unknown"):
        predict(tmp_path / "in", tmp_path / "out", "unused", "3d_fullres", predictor=_predictor(),
                output_format="dicom")


def test_cli_output_format_dicom_seg(tmp_path: Path, identity_preprocessing: None) -> None:
    from autoseg.cli import main

    root = tmp_path / "root"
    (root / "raw" / "Dataset001_Test").mkdir(parents=True)
    write_fake_checkpoint(root / "results" / "Dataset001_Test" / "3d_fullres__unet" / "fold_0" /
                          "checkpoint_final.pt", make_plans(3, spacing=(2.0, 1.0, 1.0)))
    files, _, _ = _known_series(tmp_path / "in" / "ct1", shape=(4, 16, 16), pixel_spacing=(1.0, 1.0),
                                slice_spacing=2.0)
    common = ["predict", "-i", str(tmp_path / "in"), "-d", "1", "-c", "3d_fullres", "--root", str(root),
              "--device", "cpu", "--no-mirror", "-np", "1"]
    assert main([*common, "-o", str(tmp_path / "seg"), "--output-format", "dicom-seg"]) == 0
    assert main([*common, "-o", str(tmp_path / "nifti")]) == 0
    # the same (random, deterministic) network: the SEG holds exactly what the NIfTI holds
    nifti, _ = read_segmentation(tmp_path / "nifti" / "ct1.nii.gz")
    seg = highdicom.seg.segread(tmp_path / "seg" / "ct1.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["object", "satellite"]
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in files]  # write_series returns Z order
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    np.testing.assert_array_equal(back, nifti)

