"""Planning presets (``autoseg plan D --preset NAME``): named sets of planner settings, as data.

A preset changes three settings of the planner and nothing else: which architecture the default
configurations use, the GPU memory to plan for, and the cap on how much of the dataset one batch may cover.
nnU-Net 2.x's residual-encoder presets (Isensee et al., "nnU-Net Revisited", MICCAI 2024) are the entries: ResEnc M / L / XL plan the residual-encoder U-Net for about
8 / 24 / 40 GB of GPU memory and drop the 5 % dataset-coverage cap (nnU-Net sets it to 100 %: a batch may
cover the whole dataset, so the batch is limited by memory alone).

Precedence of the GPU memory: ``--gpu-memory`` > the preset's ``gpu_memory_gb`` > the planning machine's GPU >
8 GB. An explicit number is a statement about the GPU the user will train on; the preset's number is a
default size class (nnU-Net too lets ``-gpu_memory_target`` override its presets, with a warning). The
other two settings of a preset always apply.

Adding a preset is adding a row to :data:`PRESETS`; the planner reads the fields, never the names.
"""
from __future__ import annotations

from dataclasses import dataclass

from autoseg.errors import ConfigurationError


@dataclass(frozen=True)
class Preset:
    """One row of the presets table.

    ``architecture``: registry name the default configurations (2d, 3d_fullres, 3d_cascade_fullres) use, and
    the one the 3d_lowres rule judges; ``gpu_memory_gb``: the GPU size to plan for (GiB, the unit of
    ``--gpu-memory``) unless ``--gpu-memory`` is given; ``max_dataset_fraction_per_batch``: one batch covers at
    most this fraction of the dataset's voxels (the default planner: 0.05).
    """

    name: str
    architecture: str
    gpu_memory_gb: float
    max_dataset_fraction_per_batch: float
    description: str


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("resenc-m", "resenc", 8.0, 1.0, "nnU-Net ResEnc M: residual-encoder U-Net for ~8 GB GPUs"),
        Preset("resenc-l", "resenc", 24.0, 1.0, "nnU-Net ResEnc L: residual-encoder U-Net for ~24 GB GPUs "
               "(nnU-Net's recommended default since 2024)"),
        Preset("resenc-xl", "resenc", 40.0, 1.0, "nnU-Net ResEnc XL: residual-encoder U-Net for ~40 GB GPUs"),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; unknown names raise ConfigurationError listing the choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}"
        ) from None


def preset_memory(preset: Preset, requested_gb: float | None) -> tuple[float, str]:
    """(GiB to plan for, one line saying where it came from) under ``preset``: ``requested_gb``
    (``--gpu-memory``) wins over the preset's own size."""
    if requested_gb is not None:
        return float(requested_gb), (
            f"GPU memory budget: {float(requested_gb):g} GB from --gpu-memory (overrides the "
            f"{preset.gpu_memory_gb:g} GB of --preset {preset.name})"
        )
    return preset.gpu_memory_gb, (
        f"GPU memory budget: {preset.gpu_memory_gb:g} GB from --preset {preset.name}; --gpu-memory overrides"
    )
