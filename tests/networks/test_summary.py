
import pytest
import torch

from autoseg.networks import NetworkSpec, build
from autoseg.networks.summary import (
    activation_bytes,
    count_parameters,
    estimate_flops,
    parameter_bytes,
    saved_activation_elements,
)

PLAN_3D = dict(
    patch_size=(40, 56, 48),
    strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    features=[32, 64, 128, 256],
)


def test_count_parameters_by_hand():
    conv = torch.nn.Conv3d(2, 4, 3)
    assert count_parameters(conv) == 2 * 4 * 27 + 4
    conv.bias.requires_grad_(False)
    assert count_parameters(conv, trainable_only=True) == 2 * 4 * 27


def test_flops_of_a_single_conv():
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    # one multiply-add counted as 2 FLOPs: 2 * out_elements * in_channels * kernel
    assert estimate_flops(conv, (1, 3, 8, 8)) == 2 * (5 * 8 * 8) * 3 * 9


def test_flops_on_meta_network():
    with torch.device("meta"):
        net = build(NetworkSpec("unet", 1, 2, **PLAN_3D))
    assert estimate_flops(net, (1, 1, *PLAN_3D["patch_size"])) > 1e9


def test_activation_bytes_scale_with_batch_and_dtype():
    # (speed is a benchmark's business, never a test's: machines are shared)
    one = activation_bytes(NetworkSpec("unet", 1, 2, **PLAN_3D), batch_size=1)
    two = activation_bytes(NetworkSpec("unet", 1, 2, **PLAN_3D), batch_size=2)
    assert two == 2 * one
    fp32 = activation_bytes(NetworkSpec("unet", 1, 2, **PLAN_3D), batch_size=1, dtype_bytes=4)
    assert fp32 == 2 * one


def test_activation_bytes_match_a_hand_count_for_one_stage():
    # A conv -> instance norm -> leaky relu block saves: the input (for the conv weight grad), the conv output
    # (norm input), the norm output (leaky relu, in place: saved once as its result). So at least 2 maps of
    # the output size per conv block; and the estimate must not exceed a generous upper bound.
    plan = dict(patch_size=(16, 16), strides=[[1, 1], [2, 2]], kernel_sizes=[[3, 3], [3, 3]], features=[8, 16])
    measured = activation_bytes(NetworkSpec("unet", 1, 2, **plan), batch_size=1, dtype_bytes=1)
    full, half = 16 * 16, 8 * 8
    maps = 2 * 8 * full + 2 * 16 * half + 2 * 8 * full  # encoder stage 0, stage 1, decoder stage
    assert 2 * maps <= measured <= 5 * maps


def test_parameter_bytes():
    conv = torch.nn.Conv2d(1, 1, 1)
    assert parameter_bytes(conv, optimizer_states=1) == 2 * 4 * 3


def test_the_trace_is_a_training_step_at_batch_2_so_batch_norm_behind_one_voxel_runs():
    # the planner's crash: batch norm in training on a 1x1x1 map refuses a batch of one sample
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 1), torch.nn.BatchNorm3d(4))
    with pytest.raises(ValueError, match="batch of at least 2"):
        saved_activation_elements(model, (1, 1, 1, 1, 1))
    floats, others = saved_activation_elements(model, (2, 1, 1, 1, 1))
    # conv input (2 x 1), conv output = norm input (2 x 4), the norm's running mean/var and batch mean/inverse
    # std (4 each), the output the loss holds (2 x 4)
    assert floats == 2 * 1 + 2 * 4 + 4 * 4 + 2 * 4 and others == 0
