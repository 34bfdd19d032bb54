"""The Python API does what `autoseg predict` does: files, arrays with only a spacing, bundles, and the
postprocessing find-best chose; and the example in docs/prediction.md runs as written."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.contracts.postprocessing import PostprocessingRules
from autoseg.errors import ConfigurationError
from autoseg.inference import Predictor, predict
from autoseg.io import Geometry, read_segmentation, write_image

from tests.inference.conftest import make_plans
from tests.inference.test_export import trained_root

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_MARKER = "<!-- runnable example: tests/inference/test_predictor_api.py -->"


class Threshold(nn.Module):
    """Class 1 where the intensity is above 100, class 2 above 200 (steep logits: exact argmax)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :1]
        return torch.cat([torch.zeros_like(v), v - 100.0, 2 * (v - 150.0)], dim=1)


def _predictor(rules: PostprocessingRules | None = None) -> Predictor:
    plans = make_plans(3, spacing=(2.0, 1.0, 1.0))
    predictor = Predictor([Threshold()], plans, plans.configurations["3d_fullres"], 1, device="cpu", mirror=False)
    predictor.postprocessing = rules
    return predictor


def _two_blobs() -> np.ndarray:
    values = np.full((6, 16, 20), 20.0, np.float32)
    values[1:5, 2:10, 2:10] = 150.0  # large class-1 component
    values[2:4, 12:14, 15:18] = 150.0  # small separate class-1 component
    values[1:3, 3:5, 3:5] = 250.0  # class 2 inside the large one
    return values


def _expected(values: np.ndarray) -> np.ndarray:
    return np.where(values > 200, 2, np.where(values > 100, 1, 0)).astype(np.uint8)


def test_file_array_with_spacing_and_array_with_geometry_agree(tmp_path: Path) -> None:
    predictor = _predictor()
    values = _two_blobs()
    geometry = Geometry(values.shape, (2.0, 1.0, 1.0), (5.0, -4.0, 1.0), tuple(np.eye(3).ravel()))
    write_image(values, geometry, tmp_path / "scan.nii.gz")

    from_file, file_geometry = predictor.predict(tmp_path / "scan.nii.gz")
    from_list, _ = predictor.predict([tmp_path / "scan.nii.gz"])
    from_array, array_geometry = predictor.predict(values[None], spacing=(2.0, 1.0, 1.0))
    without_channel_axis, _ = predictor.predict(values, spacing=(2.0, 1.0, 1.0))
    with_geometry, same_geometry = predictor.predict(values[None], geometry=geometry)
    for segmentation in (from_file, from_list, from_array, without_channel_axis, with_geometry):
        np.testing.assert_array_equal(segmentation, _expected(values))
    assert file_geometry.mismatch(geometry) == [] and same_geometry == geometry
    # only a spacing: identity direction, zero origin
    assert array_geometry.spacing == (2.0, 1.0, 1.0) and array_geometry.origin == (0.0, 0.0, 0.0)
    assert array_geometry.direction == tuple(np.eye(3).ravel()) and array_geometry.shape == values.shape


def test_postprocessing_is_applied_by_the_python_api_as_by_the_cli(tmp_path: Path) -> None:
    rules = PostprocessingRules(largest_component_labels=[1], labels=[1, 2])
    values = _two_blobs()
    expected = _expected(values)
    expected[2:4, 12:14, 15:18] = 0  # the small class-1 component goes
    plain, processed = _predictor(), _predictor(rules)

    np.testing.assert_array_equal(plain.predict(values, spacing=(2.0, 1.0, 1.0))[0], _expected(values))
    np.testing.assert_array_equal(processed.predict(values, spacing=(2.0, 1.0, 1.0))[0], expected)
    segmentation, probabilities = processed.predict_array(values[None], spacing=(2.0, 1.0, 1.0))
    np.testing.assert_array_equal(segmentation, expected)
    assert probabilities[1, 2:4, 12:14, 15:18].min() > 0.5  # probabilities stay the network's
    geometry = Geometry(values.shape, (2.0, 1.0, 1.0), (0.0,) * 3, tuple(np.eye(3).ravel()))
    np.testing.assert_array_equal(processed.predict_segmentation(values[None], geometry), expected)
    write_image(values, geometry, tmp_path / "in" / "pp.nii.gz")
    np.testing.assert_array_equal(processed.predict_files(tmp_path / "in" / "pp.nii.gz")[0], expected)

    # the CLI path (predict) applies the predictor's own rules, unless told not to
    assert predict(tmp_path / "in", tmp_path / "cli", predictor=processed).ok
    np.testing.assert_array_equal(read_segmentation(tmp_path / "cli" / "pp.nii.gz")[0], expected)
    assert predict(tmp_path / "in", tmp_path / "raw", predictor=processed, postprocess=False).ok
    np.testing.assert_array_equal(read_segmentation(tmp_path / "raw" / "pp.nii.gz")[0], _expected(values))


def test_from_folder_reads_postprocessing_json(tmp_path: Path) -> None:
    rules = PostprocessingRules(foreground_largest_component=True, labels=[1, 2])
    root = trained_root(tmp_path, folds=(0,), postprocessing=rules)
    with_rules = Predictor.from_folder("1", "3d_fullres", root=root, device="cpu")
    assert with_rules.postprocessing is not None and with_rules.postprocessing.foreground_largest_component
    assert Predictor.from_folder("1", "3d_fullres", root=root, device="cpu", postprocess=False).postprocessing is None


def test_arrays_need_a_spacing_that_fits() -> None:
    predictor = _predictor()
    volume = np.zeros((1, 6, 16, 20), np.float32)
    with pytest.raises(ConfigurationError, match="needs its voxel spacing"):
        predictor.predict(volume)
    with pytest.raises(ConfigurationError, match="spacing \\(1.0, 1.0\\) has 2"):
        predictor.predict(volume, spacing=(1.0, 1.0))
    with pytest.raises(ConfigurationError, match="positive"):
        predictor.predict(volume, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ConfigurationError, match="a file carries its own geometry"):
        predictor.predict("scan.nii.gz", spacing=(1.0, 1.0, 1.0))


def _documented_example() -> str:
    text = (REPO / "docs" / "prediction.md").read_text(encoding="utf-8")
    match = re.search(re.escape(EXAMPLE_MARKER) + r"\s*```python\n(.*?)```", text, re.S)
    assert match, f"docs/prediction.md lost its runnable example (the block after {EXAMPLE_MARKER})"
    return match.group(1)


def test_the_documented_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/prediction.md's Python example, executed as written next to a tiny bundle and scan."""
    from autoseg.inference.export import export_model

    root = trained_root(tmp_path / "training", folds=(0,))
    work = tmp_path / "work"
    work.mkdir()
    export_model("1", "3d_fullres", work / "model.zip", root=root)
    values = np.random.default_rng(0).uniform(1.0, 300.0, size=(12, 40, 36)).astype(np.float32)
    write_image(values, Geometry(values.shape, (2.5, 0.8, 0.8), (0.0,) * 3, tuple(np.eye(3).ravel())),
                work / "scan.nii.gz")
    monkeypatch.chdir(work)
    monkeypatch.setenv("AUTOSEG_HOME", str(tmp_path / "empty"))
    namespace: dict = {}
    exec(compile(_documented_example(), "docs/prediction.md", "exec"), namespace)
    segmentation, geometry = read_segmentation(work / "scan_seg.nii.gz")
    assert segmentation.shape == values.shape and geometry.spacing == pytest.approx((2.5, 0.8, 0.8))
    assert namespace["segmentation"].shape == (20, 64, 64)
