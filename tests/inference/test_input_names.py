"""New scans as people name them: a one-channel model takes any image file; several channels keep _CCCC and
say which files each incomplete case needs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.errors import PredictionError
from autoseg.inference import Predictor, predict
from autoseg.inference.predict import find_input_cases
from autoseg.io import Geometry, read_segmentation, write_image

from tests.inference.conftest import make_plans


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_one_channel_model_takes_any_image_file(tmp_path: Path) -> None:
    _touch(tmp_path, "hippocampus_001.nii.gz", "hippocampus_002.nii.gz", "ct_0000.nii.gz", "scan_0001.mha",
           "scan_0002.mha", "notes.txt", "dataset.json")
    cases = {c.case_id: c for c in find_input_cases(tmp_path, num_channels=1)}
    assert sorted(cases) == ["ct", "hippocampus_001", "hippocampus_002", "scan_0001", "scan_0002"]
    assert all(c.problem is None for c in cases.values())
    assert [f.name for f in cases["hippocampus_001"].files] == ["hippocampus_001.nii.gz"]
    assert cases["scan_0002"].ending == ".mha" and cases["ct"].files[0].name == "ct_0000.nii.gz"
    # without knowing the model, the raw layout's rule: these names are skipped
    assert [c.case_id for c in find_input_cases(tmp_path)] == ["ct", "scan"]


def test_one_channel_same_case_twice_is_an_error_naming_both(tmp_path: Path) -> None:
    _touch(tmp_path, "x.nii.gz", "x_0000.nii.gz", "y_0000.nii.gz", "y_0001.nii.gz", "z.nii.gz")
    cases = {c.case_id: c for c in find_input_cases(tmp_path, num_channels=1)}
    assert sorted(cases) == ["x", "y", "z"]
    assert "x.nii.gz" in cases["x"].problem and "x_0000.nii.gz" in cases["x"].problem
    assert "both be case 'x'" in cases["x"].problem
    # x_0000 with x_0001 is a two-channel case, not two scans: the model takes one
    assert "expected 1 channel file(s) per case" in cases["y"].problem and "y_0001.nii.gz" in cases["y"].problem
    assert cases["z"].problem is None


def test_several_channels_list_the_files_each_incomplete_case_needs(tmp_path: Path) -> None:
    _touch(tmp_path, "a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "c_0001.nii.gz", "plain.nii.gz",
           "rgb_0000.png")
    cases = {c.case_id: c for c in find_input_cases(tmp_path, num_channels=2)}
    assert sorted(cases) == ["a", "b", "c", "plain", "rgb"]
    assert cases["a"].problem is None
    assert cases["b"].problem.endswith(
        "b_0000.nii.gz: expected 2 channel file(s) per case (b_0000.nii.gz, b_0001.nii.gz), found b_0000.nii.gz; "
        "missing b_0001.nii.gz")
    assert "_0001" in cases["c"].problem  # starts at _0001: a gap
    assert "expected plain_0000.nii.gz, plain_0001.nii.gz" in cases["plain"].problem
    assert cases["rgb"].problem is None  # one colour image may hold every channel; the reader counts them


def test_no_images_at_all(tmp_path: Path) -> None:
    _touch(tmp_path, "notes.txt")
    with pytest.raises(PredictionError, match="no images found \\(any image file"):
        find_input_cases(tmp_path, num_channels=1)


class Threshold(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :1]
        return torch.cat([torch.zeros_like(v), v - 100.0, 2 * (v - 150.0)], dim=1)


def test_predict_writes_each_scan_under_its_own_name(tmp_path: Path) -> None:
    plans = make_plans(3, spacing=(2.0, 1.0, 1.0))
    predictor = Predictor([Threshold()], plans, plans.configurations["3d_fullres"], 1, device="cpu", mirror=False)
    rng = np.random.default_rng(0)
    expected = {}
    for name in ("hippocampus_001", "hippocampus_002"):
        values = rng.choice([50.0, 150.0, 250.0], size=(5, 12, 14)).astype(np.float32)
        write_image(values, Geometry(values.shape, (2.0, 1.0, 1.0), (0.0,) * 3, tuple(np.eye(3).ravel())),
                    tmp_path / "scans" / f"{name}.nii.gz")
        expected[name] = np.where(values > 200, 2, np.where(values > 100, 1, 0))
    report = predict(tmp_path / "scans", tmp_path / "out", predictor=predictor, num_workers=1)
    assert report.ok, report.failures
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hippocampus_001.nii.gz", "hippocampus_002.nii.gz"]
    for name, labels in expected.items():
        np.testing.assert_array_equal(read_segmentation(tmp_path / "out" / f"{name}.nii.gz")[0], labels)
