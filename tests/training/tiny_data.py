"""A tiny preprocessed dataset written straight into the store, so training tests do not depend on the
planner or the preprocessor: synthetic raw data -> z-score -> (no resampling) -> store.save_case, plus a
hand-made Plans with a tiny U-Net and a 5-fold splits.json."""
from __future__ import annotations

from pathlib import Path

import numpy as np


from autoseg.contracts.plans import ArchitectureSpec, Configuration, IntensityStats, Plans, Resampling, save_plans
from autoseg.dataset.synthetic import LABELS, SyntheticSpec, generate
from autoseg.fileio import write_json
from autoseg.io import Geometry, read_image, read_segmentation
from autoseg.preprocessing.store import CaseProperties, save_case

DATASET = "Dataset990_Tiny"


def _architecture(name: str, patch, dims: int) -> ArchitectureSpec:
    strides = [[1] * dims, [2] * dims, [2] * dims]
    kernels = [[3] * dims] * 3
    return ArchitectureSpec(name=name, patch_size=list(patch), strides=strides, kernel_sizes=kernels,
                            features=[4, 8, 16], deep_supervision=True)


def _configuration(name: str, data_identifier: str, dims: int, patch, spacing, arch: str = "unet") -> Configuration:
    from autoseg import networks

    # each architecture gets the nearest patch it accepts (e.g. unetrpp: multiples of its stem x strides),
    # as the planner would give it; the sampler pads stored cases smaller than the patch
    patch = networks.adjust_patch(arch, patch, _architecture(arch, patch, dims).strides, dims)
    return Configuration(
        name=name, data_identifier=data_identifier, dims=dims, target_spacing=list(spacing)[-dims:],
        patch_size=list(patch), batch_size=2, median_shape=list(patch), normalization=["zscore"],
        use_mask_for_norm=[False], resampling=Resampling(), architecture=_architecture(arch, patch, dims),
    )


def build_tiny_dataset(root: Path, dims: int = 3, num_cases: int = 6, extra_configurations=()) -> str:
    """Raw + preprocessed tiny dataset under ``root``; returns the dataset name."""
    if dims == 3:
        spec = SyntheticSpec(num_cases=num_cases, dims=3, shape=(16, 32, 32), spacing=(2.0, 1.0, 1.0), seed=3)
        patch, identifier, config_name = (16, 32, 32), "3d_fullres", "3d_fullres"
    else:
        spec = SyntheticSpec(num_cases=num_cases, dims=2, shape=(40, 40), spacing=(1.0, 1.0), seed=3)
        patch, identifier, config_name = (32, 32), "2d", "2d"
    raw = generate(root / "raw" / DATASET, spec)
    store = root / "preprocessed" / DATASET / identifier
    case_ids = []
    rng = np.random.default_rng(0)
    for index in range(num_cases):
        case_id = f"case_{index:03d}"
        image, geometry = read_image(raw / "imagesTr" / f"{case_id}_0000.nii.gz")
        label, _ = read_segmentation(raw / "labelsTr" / f"{case_id}.nii.gz")
        if dims == 2:
            image, label = image[:, None], label[None]
        spacing3 = list(geometry.spacing) if dims == 3 else [1.0, *geometry.spacing]
        data = ((image - image.mean()) / (image.std() + 1e-8)).astype(np.float32)
        shape = list(label.shape)
        locations = {}
        for value in (1, 2):
            points = np.argwhere(label == value)
            pick = rng.choice(len(points), size=min(50, len(points)), replace=False) if len(points) else []
            locations[str(value)] = points[pick].tolist() if len(points) else []
        properties = CaseProperties(
            case_id=case_id, geometry=geometry, original_spacing=spacing3, shape_before_crop=shape,
            bbox=[[0, s] for s in shape], shape_after_crop=shape, spacing_after_resampling=spacing3,
            shape_after_resampling=shape, class_locations=locations,
        )
        save_case(store, data, label[None].astype(np.int8), properties)
        case_ids.append(case_id)
    configurations = {config_name: _configuration(config_name, identifier, dims, patch, spec.spacing)}
    for name, arch in extra_configurations:
        configurations[name] = _configuration(name, identifier, dims, patch, spec.spacing, arch)
    plans = Plans(
        dataset_name=DATASET, channel_names={"0": "MRI"}, labels=dict(LABELS), file_ending=".nii.gz",
        configurations=configurations, default_configurations=[config_name],
        intensity_stats={"0": IntensityStats(0, 1, 0, -3, 3, -2, 2)}, median_spacing=list(spec.spacing),
        median_shape=list(spec.shape),
    )
    save_plans(plans, root / "preprocessed" / DATASET / "plans.json")
    folds = [{"train": [c for i, c in enumerate(case_ids) if i % 5 != k],
              "val": [c for i, c in enumerate(case_ids) if i % 5 == k]} for k in range(5)]
    write_json(root / "preprocessed" / DATASET / "splits.json", folds)
    return DATASET


class SimulatedClock:
    """Monotonic seconds that advance by ``tick`` each time they are read. Passed as ``train(clock=...)``, it
    makes what a --time-budget run decides (when to stop, how wide a network, how many iterations) depend on
    the code path only, never on how fast or loaded the machine is."""

    def __init__(self, tick: float = 0.01) -> None:
        self.tick, self.seconds = tick, 0.0

    def __call__(self) -> float:
        self.seconds += self.tick
        return self.seconds
