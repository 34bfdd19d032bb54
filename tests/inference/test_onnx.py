"""ONNX export: ONNX Runtime computes the same logits as torch, and preprocessing.json states this model's
numbers. Needs the onnx extra (part of the test extra, so CI runs it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx", reason="onnx not installed: pip install -e '.[onnx]' (the test extra includes it)")
pytest.importorskip("onnxscript", reason="onnxscript not installed: pip install -e '.[onnx]'")
onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install -e '.[onnx]'")

from autoseg.contracts.plans import save_plans  # noqa: E402
from autoseg.errors import ConfigurationError  # noqa: E402
from autoseg.fileio import read_json  # noqa: E402
from autoseg.inference import Predictor  # noqa: E402
from autoseg.inference.export import export_model, export_network_onnx  # noqa: E402

from tests.inference.conftest import make_plans, write_fake_checkpoint  # noqa: E402
from tests.inference.test_export import DATASET, trained_root  # noqa: E402

# The stated parity: max |ONNX Runtime - torch| at most 1e-3 of the logit range, argmax equal on > 99.9 %
RELATIVE_TOLERANCE = 1e-3
ARGMAX_AGREEMENT = 0.999


def _parity(onnx_file: Path, network: nn.Module, batch: torch.Tensor) -> tuple[float, float]:
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(["logits"], {"image": batch.numpy()})
    with torch.inference_mode():
        torch_logits = network(batch)
        torch_logits = (torch_logits[0] if isinstance(torch_logits, (list, tuple)) else torch_logits).numpy()
    assert onnx_logits.shape == torch_logits.shape
    scale = float(torch_logits.max() - torch_logits.min())
    assert scale > 0.1  # a network that outputs constants would agree with anything
    return (float(np.abs(onnx_logits - torch_logits).max()) / scale,
            float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean()))


def _root_2d(base: Path) -> Path:
    root = base / "root2d"
    (root / "raw" / DATASET).mkdir(parents=True)
    plans = make_plans(2, patch=(32, 32), spacing=(0.7, 0.7))
    save_plans(plans, root / "preprocessed" / DATASET / "plans.json")
    write_fake_checkpoint(root / "results" / DATASET / "2d__unet" / "fold_0" / "checkpoint_final.pt", plans, seed=3)
    return root


@pytest.mark.parametrize("dims", [3, 2])
def test_onnx_runtime_matches_torch(tmp_path: Path, dims: int) -> None:
    if dims == 3:
        root, configuration = trained_root(tmp_path, folds=(1,)), "3d_fullres"
    else:
        root, configuration = _root_2d(tmp_path), "2d"
    written = export_model("1", configuration, tmp_path / "onnx", format="onnx", root=root)
    assert sorted(p.name for p in written) == ["fold_1.onnx" if dims == 3 else "fold_0.onnx", "preprocessing.json"]
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted(p.name for p in written)  # one file per fold
    predictor = Predictor.from_folder("1", configuration, root=root, device="cpu")
    network = predictor.networks[0]
    patch = predictor.configuration.patch_size
    # a batch size the export never traced (it traces 2): the batch axis is really dynamic
    rng = torch.Generator().manual_seed(5)
    batch = torch.cat([torch.randn(3, 1, *patch, generator=rng) * 50 + 100,
                       torch.linspace(0, 300, int(np.prod(patch))).reshape(1, 1, *patch)])
    difference, agreement = _parity(written[0], network, batch)
    assert difference <= RELATIVE_TOLERANCE, difference
    assert agreement > ARGMAX_AGREEMENT, agreement
    description = read_json(tmp_path / "onnx" / "preprocessing.json")
    assert description["network"]["folds"][0]["max_relative_difference_to_torch"] <= RELATIVE_TOLERANCE


def test_preprocessing_json_states_the_models_numbers(tmp_path: Path) -> None:
    root = trained_root(tmp_path, folds=(0,))
    export_model("1", "3d_fullres", tmp_path / "onnx", format="onnx", root=root)
    description = read_json(tmp_path / "onnx" / "preprocessing.json")
    plans = make_plans(3, spacing=(2.0, 1.0, 1.0))
    configuration = plans.configurations["3d_fullres"]
    assert description["format"] == "autoseg-onnx-preprocessing" and description["schema_version"] == 1
    assert description["sliding_window"]["patch_size"] == configuration.patch_size == [8, 16, 16]
    assert description["sliding_window"]["step_size"] == 0.5
    assert description["sliding_window"]["gaussian_sigma_scale"] == 0.125
    # all 8 combinations of the 3 spatial axes (2, 3, 4 of [batch, channel, Z, Y, X]), the plain window first
    axes = description["sliding_window"]["mirror_axes"]
    assert len(axes) == 8 and axes[0] == [] and sorted(max(a) for a in axes if a) == [2, 3, 3, 4, 4, 4, 4]
    assert description["resampling"]["target_spacing"] == [2.0, 1.0, 1.0]
    assert description["resampling"]["order_image"] == configuration.resampling.order_image
    assert [c["scheme"] for c in description["normalization"]["per_channel"]] == ["none"]
    assert description["network"]["input"] == {"name": "image", "dtype": "float32", "shape": ["batch", 1, 8, 16, 16]}
    assert description["network"]["output"]["shape"] == ["batch", 3, 8, 16, 16]
    assert description["labels"] == plans.labels and description["network"]["opset"] >= 17
    assert description["axes"]["transpose_forward"] == [0, 1, 2]


class DataDependentBranch(nn.Module):
    """Python control flow on tensor values: torch.export cannot trace it into a graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


def test_an_architecture_the_exporter_cannot_convert_fails_in_one_line(tmp_path: Path) -> None:
    target = tmp_path / "fold_0.onnx"
    with pytest.raises(ConfigurationError, match="cannot convert architecture 'branchy'") as error:
        export_network_onnx(DataDependentBranch(), 1, (4, 4, 4), target, "branchy")
    assert "\n" not in str(error.value) and "bundle" in str(error.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
