"""Every registered architecture, planned over the range of datasets the planner meets, must build its network
and run a training step on the planned patch.

A plan the network cannot take is the planner's worst failure: it surfaces as a traceback during `autoseg
plan` (the memory trace) or hours later in training. Each architecture declares its limits in its
``@register`` constraint function; this sweep holds every architecture to them.

The grid: median image shapes from 64^2 to 2048^2 (2D) and 16x64x64 to 800x512x512 (3D); spacings
isotropic, CT-like (1.0 x 0.8 x 0.8 mm), 5 mm slices with the coarse axis first and last; 1-4 channels;
budgets 2-80 GB. Not the cartesian product (300 plans per architecture): for every architecture and
dimensionality, as many combinations as the longest axis has values, the i-th taking the i-th value of
every axis (cycling the shorter ones), so every value of every axis is planned at least once. Forward passes
run on PyTorch's ``meta`` device (shapes only, no memory); tiny patches also run for real on the CPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from autoseg import networks
from autoseg.errors import ConfigurationError
from autoseg.planning.memory import memory_budget_bytes
from autoseg.planning.planner import MIN_BATCH_SIZE, plan_network

SHAPES = {
    2: [(64, 64), (200, 320), (512, 512), (1024, 1024), (2048, 2048)],
    3: [(16, 64, 64), (48, 128, 128), (160, 200, 200), (256, 320, 320), (800, 512, 512)],
}
SPACINGS = {
    2: [(1.0, 1.0), (5.0, 0.8), (0.8, 0.8), (0.8, 5.0)],
    3: [(1.0, 1.0, 1.0), (5.0, 0.8, 0.8), (1.0, 0.8, 0.8), (0.8, 0.8, 5.0)],
}
CHANNELS = [1, 2, 3, 4]
BUDGETS_GB = [2.0, 4.0, 8.0, 24.0, 80.0]
NUM_CLASSES = 3
CASES_PER_DATASET = 20
# a real CPU forward pass only where it costs well under a second
REAL_FORWARD_MAX_VOXELS = {2: 64 * 64, 3: 16 * 32 * 32}


def _combinations() -> list[tuple[str, tuple[int, ...], tuple[float, ...], int, float]]:
    combos = []
    for architecture in networks.available():
        for dims in networks.get(architecture).dims:
            axes = [SHAPES[dims], SPACINGS[dims], CHANNELS, BUDGETS_GB]
            for i in range(max(len(values) for values in axes)):
                shape, spacing, channels, budget = (values[i % len(values)] for values in axes)
                combos.append((architecture, shape, spacing, channels, budget))
    return combos


def _combination_id(combo) -> str:
    architecture, shape, spacing, channels, budget = combo
    return (f"{architecture}-{'x'.join(map(str, shape))}-at-{'x'.join(f'{s:g}' for s in spacing)}mm-"
            f"{channels}ch-{budget:g}GB")


COMBINATIONS = _combinations()


def test_the_grid_covers_every_value_of_every_axis_for_every_architecture():
    for architecture in networks.available():
        for dims in networks.get(architecture).dims:
            mine = [c for c in COMBINATIONS if c[0] == architecture and len(c[1]) == dims]
            assert {c[1] for c in mine} == set(SHAPES[dims])
            assert {c[2] for c in mine} == set(SPACINGS[dims])
            assert {c[3] for c in mine} == set(CHANNELS)
            assert {c[4] for c in mine} == set(BUDGETS_GB)


def _check_outputs(network: torch.nn.Module, outputs, batch: int, patch: tuple[int, ...]) -> None:
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    assert tuple(outputs[0].shape) == (batch, NUM_CLASSES, *patch)
    assert len(outputs) == len(network.ds_scales)
    for output, scale in zip(outputs, network.ds_scales):
        expected = tuple(int(round(p * s)) for p, s in zip(patch, scale))
        assert tuple(output.shape) == (batch, NUM_CLASSES, *expected)


def check_plan_runs(architecture: str, plan, in_channels: int) -> None:
    """The planned network accepts its patch: constraints, a training step at the planned batch and an
    inference pass at batch 1 (meta device), and a real CPU pass for tiny patches."""
    topology, patch = plan.topology, tuple(plan.patch_size)
    dims = len(patch)
    options = networks.constraint_options(architecture, plan.options)
    assert networks.constraints(architecture, patch, dims, strides=topology.strides, **options) == []
    assert plan.batch_size >= MIN_BATCH_SIZE
    args = (architecture, in_channels, NUM_CLASSES, patch, topology.strides, topology.kernel_sizes,
            topology.features)
    with torch.device("meta"):
        network = networks.build(networks.NetworkSpec(*args, options=plan.options))
    network.train()
    _check_outputs(network, network(torch.zeros(plan.batch_size, in_channels, *patch, device="meta")),
                   plan.batch_size, patch)
    network.eval()
    with torch.no_grad():
        _check_outputs(network, network(torch.zeros(1, in_channels, *patch, device="meta")), 1, patch)
    if math.prod(patch) <= REAL_FORWARD_MAX_VOXELS[dims]:
        torch.manual_seed(0)
        network = networks.build(networks.NetworkSpec(*args, options=plan.options)).eval()
        with torch.no_grad():
            outputs = network(torch.randn(1, in_channels, *patch))
        _check_outputs(network, outputs, 1, patch)
        first = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        assert torch.isfinite(first).all()


@pytest.mark.parametrize("combo", COMBINATIONS, ids=[_combination_id(c) for c in COMBINATIONS])
def test_every_plan_builds_and_runs_on_its_patch(combo):
    architecture, shape, spacing, channels, budget = combo
    options = dict(networks.get(architecture).default_options)
    try:
        plan = plan_network(architecture, spacing, shape, channels, NUM_CLASSES, budget,
                            math.prod(shape) * CASES_PER_DATASET, options=options)
    except ConfigurationError as exc:
        # leaving an architecture out is allowed, crashing is not; but none of this grid should need it
        pytest.fail(f"{architecture} could not be planned: {exc}")
    check_plan_runs(architecture, plan, channels)
    fits = plan.memory_bytes <= memory_budget_bytes(budget)
    assert fits or any("exceeds" in note for note in plan.notes), plan.notes


# The reported failures (the UNETR++ bottleneck of one voxel, traced at batch 1) beyond the grid (which holds
# 160x200x200 at 1.0x0.8x0.8 mm and 8 GB): a larger CT-like dataset, and a small one at small budgets.
@pytest.mark.parametrize("shape,spacing,budget", [
    ((256, 320, 320), (1.0, 0.8, 0.8), 8.0),
    ((48, 128, 128), (1.0, 1.0, 1.0), 0.25),
    ((48, 128, 128), (1.0, 1.0, 1.0), 0.5),
    ((48, 128, 128), (1.0, 1.0, 1.0), 1.0),
])
def test_unetrpp_plans_the_reported_datasets(shape, spacing, budget):
    plan = plan_network("unetrpp", spacing, shape, 1, NUM_CLASSES, budget, math.prod(shape) * 6)
    check_plan_runs("unetrpp", plan, 1)
    # no axis collapses to a sliver at small budgets (the shrink once cut 32x64x32 to 32x2x32)
    assert min(plan.patch_size) >= 16, plan.patch_size
