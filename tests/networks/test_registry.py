import pytest
import torch

from autoseg.errors import ConfigurationError
from autoseg.networks import adjust_patch, available, build, check_patch, constraints, get, patch_divisor

from .tiny_plans import TINY_3D

STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]


def test_available_lists_unet():
    assert "unet" in available()
    info = get("unet")
    assert info.dims == (2, 3) and info.supports_selfreg and info.description


def test_unknown_name_lists_choices():
    with pytest.raises(ConfigurationError, match="available: .*unet"):
        get("vnet")


def test_unet_divisor_and_adjust():
    assert patch_divisor("unet", STRIDES, 3) == (4, 8, 8)
    assert adjust_patch("unet", (41, 55, 50), STRIDES, 3) == (40, 56, 48)
    assert adjust_patch("unet", (1, 1, 1), STRIDES, 3) == (4, 8, 8)


def test_constraints_reject_with_clear_message():
    problems = constraints("unet", (40, 50, 48), 3, strides=STRIDES)
    assert problems and "axis 1 size 50 is not divisible by 8" in problems[0]
    with pytest.raises(ConfigurationError) as excinfo:
        check_patch("unet", (40, 50, 48), 3, strides=STRIDES)
    message = str(excinfo.value)
    assert "'unet'" in message and "(40, 50, 48)" in message and "Fix:" in message and "(40, 48, 48)" in message
    assert constraints("unet", (40, 56, 48), 3, strides=STRIDES) == []


def test_wrong_dimensionality_is_rejected():
    assert constraints("unet", (16, 16), 3)


def test_build_rejects_invalid_patch_and_unknown_option():
    plan = dict(TINY_3D, patch_size=(8, 15, 12))
    with pytest.raises(ConfigurationError, match="not divisible"):
        build("unet", 1, 2, **plan)
    with pytest.raises(ConfigurationError, match="no option.*nrom"):
        build("unet", 1, 2, nrom="batch", **TINY_3D)


def test_build_rejects_mismatched_topology():
    plan = dict(TINY_3D, features=[4, 8])
    with pytest.raises(ConfigurationError, match="differ in length"):
        build("unet", 1, 2, **plan)


def test_every_architecture_builds_on_meta_from_the_common_topology():
    # the planner's 3D/2D topologies must map onto every registered architecture that supports the dims
    plans = {
        3: dict(patch_size=(32, 64, 64), strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 4, features=[32, 64, 128, 256, 320]),
        2: dict(patch_size=(64, 64), strides=[[1, 1]] + [[2, 2]] * 4, kernel_sizes=[[3, 3]] * 5,
                features=[32, 64, 128, 256, 512]),
    }
    for name in available():
        for dims in get(name).dims:
            plan = plans[dims]
            patch = adjust_patch(name, plan["patch_size"], plan["strides"], dims)
            with torch.device("meta"):
                net = build(name, 1, 3, **dict(plan, patch_size=patch))
                outputs = net(torch.zeros(1, 1, *patch))
            assert outputs[0].shape == (1, 3, *patch), name
