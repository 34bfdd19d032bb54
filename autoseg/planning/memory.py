"""Training-memory estimate of a configuration, measured on the real network.

``training_memory_bytes`` = parameters + gradients + SGD momentum (fp32) + ``batch_size`` x the activations
one sample keeps for the backward pass. Activations come from :mod:`autoseg.networks.summary`, which builds
the network on PyTorch's ``meta`` device and records every tensor autograd saves during one training step
at a batch of 2 (the planner's smallest; a batch of 1 makes batch norm fail behind a one-voxel bottleneck),
divided by 2: no arithmetic, no memory, and no per-architecture constants.

One calibration turns a GPU size into a byte budget (``BUDGET_FRACTION``). What the saved tensors do not
show (cuDNN workspaces, temporaries freed during the forward pass, the CUDA context, allocator
fragmentation, the data in flight) is folded into it. It was fixed once, on the plain U-Net, so that our
planner reproduces nnU-Net v2's patch and batch decisions (docs/planning.md, "Memory budget"):

- nnU-Net's budget for 8 GB is 560e6 "feature-map elements" per sample at a reference batch of 2 (3D) and
  85e6 at batch 12 (2D) (nnU-Net v2 2.8.1 ExperimentPlanner): 1.12e9 and 1.02e9 elements per batch.
- On the plain U-Net our trace gives 3.99 bytes per nnU-Net element (measured on six topologies from 44x56x48
  to 512x512, spread < 0.2 %; tests/planning/test_memory.py re-measures it).
- 3D: 1.12e9 x 3.99 = 4.47e9 bytes of activations + ~0.37e9 of parameters/optimiser state (6-stage
  3D U-Net); 2D: 1.02e9 x 3.99 = 4.07e9 + ~0.5e9 (7-stage 2D U-Net). The midpoint, 4.7e9 bytes per
  8 GiB, is the fraction below; 3D patches come out ~3 % under nnU-Net's and 2D ones ~3 % over.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing autoseg.networks imports torch, which this module defers (see _traced)
    from autoseg.networks import NetworkSpec


BUDGET_FRACTION = 4.7e9 / (8 * 2**30)  # of the GPU memory; see the module docstring
GIB = 2**30
ACTIVATION_DTYPE_BYTES = 2  # training runs under AMP on CUDA (design.md): fp16/bf16 activations
OPTIMIZER_STATES = 1  # SGD with momentum (design.md, training defaults)


def memory_budget_bytes(gpu_memory_gb: float) -> int:
    """Bytes a training step may use on a GPU with ``gpu_memory_gb`` GiB (calibrated, see module docstring)."""
    return int(gpu_memory_gb * GIB * BUDGET_FRACTION)


@functools.lru_cache(maxsize=4096)
def _traced(spec: NetworkSpec) -> tuple[int, int]:
    """(activation bytes of ONE sample, parameter+gradient+optimiser bytes), cached per network spec (the
    spec hashes its numbers and options, so the patch search traces each candidate once)."""
    # torch is imported here, not at module level: preprocessing workers import autoseg.planning (for the
    # plans dataclasses) and should not pay the ~1.6 s torch import per process.
    import torch

    from autoseg.networks import build
    from autoseg.networks.summary import TRACE_BATCH, parameter_bytes, training_activation_bytes

    with torch.device("meta"):
        model = build(spec)
    # a training step at the smallest batch the planner gives (2), per sample: batch-statistics layers
    # see the batch they will see in training, and the bytes are linear in the batch
    per_batch = training_activation_bytes(
        model, spec.in_channels, spec.patch_size, TRACE_BATCH, ACTIVATION_DTYPE_BYTES
    )
    return int(round(per_batch / TRACE_BATCH)), int(parameter_bytes(model, OPTIMIZER_STATES))


def memory_components(spec: NetworkSpec) -> tuple[int, int]:
    """``(per_sample_activation_bytes, fixed_bytes)`` of the network ``spec`` at its patch (voxels, array
    order).

    Activations scale with the batch (every saved tensor has a batch axis); ``fixed_bytes`` (parameters,
    gradients, momentum, fp32) do not.
    """
    return _traced(spec)


def training_memory_bytes(spec: NetworkSpec, batch_size: int) -> int:
    """Estimated bytes of one training step: fixed bytes + ``batch_size`` x per-sample activations."""
    per_sample, fixed = memory_components(spec)
    return fixed + batch_size * per_sample


def batch_size_for_budget(per_sample_bytes: int, fixed_bytes: int, budget_bytes: int) -> int:
    """How many samples fit in what the budget leaves after the fixed bytes (may be 0)."""
    return max(0, math.floor((budget_bytes - fixed_bytes) / max(per_sample_bytes, 1)))
