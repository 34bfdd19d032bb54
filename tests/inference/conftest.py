"""Fakes for the inference tests: hand-made plans, fake checkpoints, and an identity preprocessing.

The identity preprocessing implements the contract of ``autoseg.preprocessing.preprocess_case`` /
``restore_probabilities`` (docs/internals.md) for plans whose target spacing equals the image spacing and
whose normalisation is "none": no crop, no resampling, 2D images get a Z axis of 1. It lets these tests run
before (and independently of) the preprocessing package; tests marked ``real_preprocessing`` use the real one.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.contracts.plans import ArchitectureSpec, Configuration, IntensityStats, Plans, Resampling
from autoseg.io import Geometry
from autoseg.preprocessing.store import CaseProperties

LABELS = {"background": 0, "object": 1, "satellite": 2}


def make_plans(dims: int = 3, channels: int = 1, patch: tuple[int, ...] | None = None,
               spacing: tuple[float, ...] | None = None, name: str | None = None) -> Plans:
    """Plans with one configuration using a tiny plain U-Net (milliseconds per window on CPU)."""
    if dims == 3:
        patch = patch or (8, 16, 16)
        strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
        kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
        spacing = spacing or (2.5, 0.8, 0.8)
    else:
        patch = patch or (16, 16)
        strides = [[1, 1], [2, 2], [2, 2]]
        kernels = [[3, 3], [3, 3], [3, 3]]
        spacing = spacing or (1.0, 1.0)
    name = name or ("3d_fullres" if dims == 3 else "2d")
    architecture = ArchitectureSpec("unet", list(patch), strides, kernels, [4, 8, 16], deep_supervision=True)
    configuration = Configuration(
        name=name, data_identifier=name, dims=dims, target_spacing=list(spacing), patch_size=list(patch),
        batch_size=2, median_shape=[float(p) for p in patch], normalization=["none"] * channels,
        use_mask_for_norm=[False] * channels, resampling=Resampling(), architecture=architecture,
    )
    stats = IntensityStats(0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0)
    return Plans(
        dataset_name="Dataset001_Test", channel_names={str(c): f"MRI{c}" for c in range(channels)},
        labels=dict(LABELS), file_ending=".nii.gz", configurations={name: configuration},
        default_configurations=[name], intensity_stats={str(c): stats for c in range(channels)},
        median_spacing=list(spacing), median_shape=[float(p) for p in patch],
    )


def build_tiny_network(plans: Plans, seed: int = 0) -> nn.Module:
    from autoseg import networks

    configuration = next(iter(plans.configurations.values()))
    torch.manual_seed(seed)
    return networks.build(configuration.architecture.network_spec(plans.num_channels, plans.num_classes))


def write_fake_checkpoint(path: Path, plans: Plans, fold: int = 0, seed: int = 0) -> Path:
    """A checkpoint in the documented format holding a randomly initialised tiny U-Net."""
    configuration = next(iter(plans.configurations.values()))
    network = build_tiny_network(plans, seed)
    checkpoint = {
        "format": "autoseg-checkpoint",
        "format_version": 1,
        "network": network.state_dict(),
        "optimizer": None,
        "scheduler": None,
        "rng": {},
        "metadata": {
            "dataset_name": plans.dataset_name, "configuration": asdict(configuration), "plans": plans.to_json(),
            "fold": fold, "epoch": 1, "architecture": configuration.architecture.name,
            "in_channels": plans.num_channels, "num_classes": plans.num_classes, "selfreg": False, "curves": {},
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


# ------------------------------------------------------------------------------ identity preprocessing
def identity_preprocess_case(image: np.ndarray, geometry: Geometry, plans: Plans, configuration: Configuration,
                             label: Any = None, case_id: str = "") -> tuple[np.ndarray, None, CaseProperties]:
    data = image[:, None] if geometry.dims == 2 else image
    spacing = [999.0, *geometry.spacing] if geometry.dims == 2 else list(geometry.spacing)
    shape = list(data.shape[1:])
    properties = CaseProperties(
        case_id=case_id, geometry=geometry, original_spacing=spacing, shape_before_crop=shape,
        bbox=[[0, s] for s in shape], shape_after_crop=shape, spacing_after_resampling=spacing,
        shape_after_resampling=shape,
    )
    if label is not None:
        label = np.asarray(label).reshape((1, *shape)).astype(np.int8)
    return np.ascontiguousarray(data, dtype=np.float32), label, properties


def identity_restore_probabilities(probabilities: np.ndarray, properties: CaseProperties,
                                   configuration: Configuration) -> np.ndarray:
    out = np.asarray(probabilities, dtype=np.float32)
    return out[:, 0] if properties.geometry.dims == 2 else out


def identity_restore_segmentation(seg: np.ndarray, properties: CaseProperties, configuration: Configuration) -> np.ndarray:
    return seg[0] if properties.geometry.dims == 2 else seg


def _real_preprocessing_available() -> bool:
    try:
        from autoseg.preprocessing import preprocess_case, restore_probabilities  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(params=["identity", "real"])
def preprocessing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the identity fake and, when installed, the real preprocessing package."""
    if request.param == "identity":
        monkeypatch.setattr(
            "autoseg.inference.predictor.preprocessing_functions",
            lambda: (identity_preprocess_case, identity_restore_probabilities, identity_restore_segmentation),
        )
    elif not _real_preprocessing_available():
        pytest.skip("autoseg.preprocessing.preprocess_case is not available yet")
    return request.param


@pytest.fixture
def identity_preprocessing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "autoseg.inference.predictor.preprocessing_functions",
        lambda: (identity_preprocess_case, identity_restore_probabilities, identity_restore_segmentation),
    )


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
