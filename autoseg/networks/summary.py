"""Parameter counts, FLOPs and training-memory estimates for any registered network.

The planner uses :func:`activation_bytes` in its patch/batch search: it builds the real network on the
``meta`` device (no memory, no arithmetic) and runs one forward pass while recording every tensor autograd
saves for the backward pass. That is the activation memory a training step holds at its peak, measured on the
actual architecture, so a new architecture needs no hand-tuned constant (design.md section 2, plans.json).

The trace is a *training* step, so it runs at a batch of at least ``TRACE_BATCH`` = 2, the smallest batch
the planner ever gives (a batch-norm layer in training mode refuses one value per channel, which a batch of
one with a 1x1x1 bottleneck would give it). Smaller batches are traced at 2 and scaled down: every saved
tensor has a batch axis, so the bytes are linear in the batch.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autoseg.networks.registry import build
from autoseg.networks.spec import NetworkSpec

TRACE_BATCH = 2  # a training step's smallest batch (the planner's minimum); see the module docstring


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on ``meta`` modules too, which is how we check published sizes)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def estimate_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass for an input of ``input_shape`` (``[B, C, *spatial]``).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls, attention), which counts
    one multiply-add as **2** FLOPs. The papers' "FLOPs" (fvcore) count multiply-adds, so divide by 2 to
    compare with them (architectures.md 3.7). Normalisation and activation layers are not counted. Runs on
    the model's device; a ``meta`` model costs nothing.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    x = torch.zeros(tuple(input_shape), device=device)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def saved_activation_elements(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """(floating-point elements, bytes of non-float tensors) saved for backward in one training forward.

    Every tensor autograd packs for the backward pass goes through ``saved_tensors_hooks``; parameters are
    excluded (they are counted separately) and a tensor saved by two operations is counted once. The model
    is put in training mode (dropout masks and normalisation statistics count as they would in training), so
    the batch ``input_shape[0]`` must be at least ``TRACE_BATCH`` (batch-norm needs more than one value per
    channel); :func:`activation_bytes` scales a trace at 2 down to a batch of 1.
    """
    if int(input_shape[0]) < TRACE_BATCH:
        raise ValueError(
            f"a training-mode trace needs a batch of at least {TRACE_BATCH} (batch-statistics layers), "
            f"got input shape {tuple(input_shape)}"
        )
    parameter_ids = {id(p) for p in model.parameters()}
    seen: dict[int, torch.Tensor] = {}  # keep references so ids are not reused during the trace
    totals = [0, 0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) in parameter_ids or id(tensor) in parameter_ids or id(base) in seen:
            return tensor
        seen[id(base)] = base
        if base.is_floating_point():
            totals[0] += base.numel()
        else:
            totals[1] += base.numel() * base.element_size()
        return tensor

    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("meta")
    x = torch.zeros(tuple(input_shape), device=device)
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            outputs = model(x)
    finally:
        model.train(was_training)
    # the outputs (logits at every deep-supervision scale) are held by the loss as well
    for output in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
        if id(output) not in seen:
            totals[0] += output.numel()
    return totals[0], totals[1]


def activation_bytes(spec: NetworkSpec, batch_size: int, dtype_bytes: int = 2) -> int:
    """Bytes of activations one training step of the network ``spec`` keeps for backward at its patch and
    ``batch_size``.

    Builds the network on the ``meta`` device and traces one forward pass (see
    :func:`saved_activation_elements`) at ``max(batch_size, TRACE_BATCH)``; a batch of 1 is half the trace
    at 2. ``dtype_bytes``: 2 under AMP (fp16/bf16 activations), 4 in fp32. Parameters, gradients and
    optimiser state are not included: see :func:`parameter_bytes`.
    """
    with torch.device("meta"):
        model = build(spec)
    return training_activation_bytes(model, spec.in_channels, spec.patch_size, batch_size, dtype_bytes)


def training_activation_bytes(
    model: nn.Module, in_channels: int, patch_size: Sequence[int], batch_size: int, dtype_bytes: int = 2
) -> int:
    """Activation bytes of one training step of a built ``model`` at ``batch_size`` x ``patch_size``
    (traced at ``max(batch_size, TRACE_BATCH)``, scaled linearly to ``batch_size``)."""
    traced_batch = max(int(batch_size), TRACE_BATCH)
    float_elements, other_bytes = saved_activation_elements(model, (traced_batch, in_channels, *patch_size))
    return int(round((float_elements * dtype_bytes + other_bytes) * batch_size / traced_batch))


def parameter_bytes(model: nn.Module, optimizer_states: int = 1) -> int:
    """fp32 bytes of parameters + gradients + ``optimizer_states`` buffers per parameter (SGD momentum: 1,
    Adam: 2). Matters for UNETR++, whose parameter count grows with the patch (architectures.md 3.6)."""
    return count_parameters(model) * 4 * (2 + optimizer_states)
