import pytest
import torch

from autoseg.networks import (
    NetworkError,
    NetworkSpec,
    adjust_patch,
    available,
    build,
    check_patch,
    constraints,
    get,
    patch_divisor,
)

from .tiny_plans import TINY_3D

STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]


def test_available_lists_unet():
    assert "unet" in available()
    info = get("unet")
    assert info.dims == (2, 3) and info.supports_selfreg and info.description


def test_unknown_name_lists_choices():
    with pytest.raises(NetworkError, match="available: .*unet"):
        get("vnet")


def test_unet_divisor_and_adjust():
    assert patch_divisor("unet", STRIDES, 3) == (4, 8, 8)
    assert adjust_patch("unet", (41, 55, 50), STRIDES, 3) == (40, 56, 48)
    # one divisor (4, 8, 8) would leave a 1x1x1 bottleneck, which instance norm refuses: the smallest
    # accepted patch holds two bottleneck voxels
    assert adjust_patch("unet", (1, 1, 1), STRIDES, 3) == (8, 8, 8)


@pytest.mark.parametrize("name", ["unet", "unetpp"])
def test_a_one_voxel_bottleneck_is_declared_and_really_fails(name):
    problems = constraints(name, (4, 8, 8), 3, strides=STRIDES)
    assert len(problems) == 1 and "bottleneck (1, 1, 1) holds fewer than 2 voxels" in problems[0]
    assert constraints(name, (4, 8, 16), 3, strides=STRIDES) == []
    # the declaration is not over-cautious: the network really cannot take that patch (its check is skipped)
    network = get(name).builder(1, 2, (4, 8, 8), STRIDES, [[3, 3, 3]] * 4, [4, 8, 8, 8]).eval()
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        network(torch.zeros(1, 1, 4, 8, 8))
    network(torch.zeros(1, 1, 4, 8, 16))


def test_constraint_options_keep_what_the_constraint_and_divisor_functions_read(monkeypatch):
    import dataclasses

    from autoseg.networks import constraint_options, registry

    options = {"stem": 8, "windows": [4, 4, 4, 4], "size": "base"}
    assert constraint_options("unet2022", options) == options  # its functions take **kwargs: all pass
    strict = dataclasses.replace(
        get("unet"), name="strict",
        constraints=lambda patch_size, dims, strides=None, stem=4: [],
        divisor=lambda strides, dims, stem=4, windows=None: (1,) * dims,
    )
    monkeypatch.setitem(registry._REGISTRY, "strict", strict)
    assert constraint_options("strict", options) == {"stem": 8}  # read by both; size only by the builder


def test_constraints_reject_with_clear_message():
    problems = constraints("unet", (40, 50, 48), 3, strides=STRIDES)
    assert problems and "axis 1 size 50 is not divisible by 8" in problems[0]
    with pytest.raises(NetworkError) as excinfo:
        check_patch("unet", (40, 50, 48), 3, strides=STRIDES)
    message = str(excinfo.value)
    assert "'unet'" in message and "(40, 50, 48)" in message and "Fix:" in message and "(40, 48, 48)" in message
    assert constraints("unet", (40, 56, 48), 3, strides=STRIDES) == []


def test_wrong_dimensionality_is_rejected():
    assert constraints("unet", (16, 16), 3)


def test_build_rejects_invalid_patch_and_unknown_option():
    plan = dict(TINY_3D, patch_size=(8, 15, 12))
    with pytest.raises(NetworkError, match="not divisible"):
        build(NetworkSpec("unet", 1, 2, **plan))
    with pytest.raises(NetworkError, match="no option.*nrom"):
        build(NetworkSpec("unet", 1, 2, **TINY_3D, options=dict(nrom="batch")))


def test_build_rejects_mismatched_topology():
    plan = dict(TINY_3D, features=[4, 8])
    with pytest.raises(NetworkError, match="differ in length"):
        build(NetworkSpec("unet", 1, 2, **plan))


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
                net = build(NetworkSpec(name, 1, 3, **dict(plan, patch_size=patch)))
                outputs = net(torch.zeros(1, 1, *patch))
            assert outputs[0].shape == (1, 3, *patch), name


AMP_CASES = [
    ("unet", TINY_3D, {}),
    ("unetpp", TINY_3D, {}),
    ("unet2022", dict(TINY_3D, patch_size=(128, 128)), dict(embed_dim=32, stem=8, windows=[4, 4, 4, 2])),
    ("unetrpp", dict(TINY_3D, patch_size=(8, 32, 32)),
     dict(stem_stride=(1, 2, 2), stage_strides=[(1, 2, 2)] * 3)),
]


@pytest.mark.parametrize("name, plan, options", AMP_CASES, ids=[c[0] for c in AMP_CASES])
def test_every_architecture_runs_under_autocast(name, plan, options):
    # AMP safety: mixed dtypes inside attention (fp32 temperatures/biases vs bf16 activations) must not clash
    dims = len(plan["patch_size"])
    plan = dict(plan, strides=[[1] * dims, [2] * dims], kernel_sizes=[[3] * dims] * 2, features=[4, 8])
    net = build(NetworkSpec(name, 1, 2, **plan, options=options))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = net(torch.randn(1, 1, *plan["patch_size"]))
    assert outputs[0].dtype == torch.bfloat16 and torch.isfinite(outputs[0].float()).all()
    sum(o.float().mean() for o in outputs).backward()


def test_unet_compiles_without_graph_breaks():
    # torch.compile-ability: one full graph (aot_eager needs no C++ toolchain; the other architectures pass the
    # same check, see docs/architectures.md, but take 20-70 s each on 2 CPU cores)
    net = build(NetworkSpec("unet", 1, 2, **TINY_3D)).eval()
    x = torch.randn(1, 1, *TINY_3D["patch_size"])
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x)[0], net(x)[0])
