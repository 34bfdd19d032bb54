import pytest
import torch

from autoseg.networks import (
    NetworkError,
    NetworkSpec,
    adjust_patch,
    build,
    check_patch,
    constraints,
    get,
    patch_divisor,
)
from autoseg.networks.summary import count_parameters
from autoseg.networks.unetrpp import map_topology

IGNORED = dict(strides=[[1, 1, 1], [2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 2, features=[32, 64])
# a small anisotropic plan: stem (1, 2, 2), the coarse axis never halved (stage shapes 8x16x16 .. 8x2x2)
TINY = dict(patch_size=(8, 32, 32))
TINY_OPTIONS = dict(stem_stride=(1, 2, 2), stage_strides=[(1, 2, 2)] * 3)


@pytest.mark.parametrize("variant", ["synapse", "acdc", "brats"])
def test_forward_backward_tiny_anisotropic(variant):
    net = build(NetworkSpec("unetrpp", 2, 3, **TINY, **IGNORED, options=dict(TINY_OPTIONS, variant=variant))).train()
    outputs = net(torch.randn(1, 2, 8, 32, 32))
    # heads on the 16- (full), 32- (P / stem) and 64-channel (P / (stem * first stage stride)) maps
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 8, 32, 32), (1, 3, 8, 16, 16), (1, 3, 8, 8, 8)]
    assert net.ds_scales == [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5), (1.0, 0.25, 0.25)]
    assert net.ds_weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    sum(o.pow(2).mean() for o in outputs).backward()
    assert net.stem[0].weight.grad is not None and net.encoder[3][0].position.grad is not None


def test_fixed_patch_size_is_enforced_with_a_clear_message():
    net = build(NetworkSpec("unetrpp", 1, 2, deep_supervision=False, **TINY, **IGNORED, options=TINY_OPTIONS))
    assert get("unetrpp").fixed_patch_size
    with pytest.raises(ValueError, match=r"built for patch \(8, 32, 32\).*training patch"):
        net(torch.randn(1, 1, 8, 64, 32))


def test_faithful_order_differs_from_correct_order():
    torch.manual_seed(0)
    a = build(NetworkSpec("unetrpp", 1, 2, **TINY, **IGNORED, options=TINY_OPTIONS)).eval()
    b = build(NetworkSpec("unetrpp", 1, 2, **TINY, **IGNORED,
                          options=dict(TINY_OPTIONS, faithful_sa_order=True))).eval()
    b.load_state_dict(a.state_dict())
    attention_a, attention_b = a.encoder[1][0].attention, b.encoder[1][0].attention
    tokens = torch.randn(1, 8 * 8 * 8, 64)
    with torch.no_grad():
        assert not torch.allclose(attention_a(tokens), attention_b(tokens))


@pytest.mark.parametrize(
    "patch, variant, stem, in_channels, classes, expected, shapes",
    [
        ((64, 128, 128), "synapse", (2, 4, 4), 1, 14, 42_952_850,
         [(14, 64, 128, 128), (14, 32, 32, 32), (14, 16, 16, 16)]),
        ((128, 128, 128), "brats", (4, 4, 4), 4, 4, 42_647_604, None),
        ((16, 160, 160), "acdc", (1, 4, 4), 1, 4, 66_796_404,
         [(4, 16, 160, 160), (4, 16, 40, 40), (4, 8, 20, 20)]),
        ((32, 192, 192), "lung", (1, 4, 4), 1, 2, 121_174_798, None),  # architectures.md 3.7 [computed]
    ],
)
def test_published_parameter_counts(patch, variant, stem, in_channels, classes, expected, shapes):
    # architectures.md 6.3 (DS heads included, as in the vectors); built and traced on meta: no memory
    with torch.device("meta"):
        net = build(NetworkSpec("unetrpp", in_channels, classes, patch, **IGNORED,
                                options=dict(variant=variant, stem_stride=stem)))
        outputs = net(torch.zeros(1, in_channels, *patch))
    assert abs(count_parameters(net) - expected) / expected < 0.1
    assert count_parameters(net) == expected  # our implementation reproduces them exactly
    if shapes:
        assert [tuple(o.shape[1:]) for o in outputs] == shapes


def test_topology_mapping_from_the_plain_unet_plan():
    # nnU-Net-like plan for 64x128x128: total stride (16, 32, 32) -> the paper's Synapse stem (2, 4, 4)
    synapse_plan = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert map_topology(synapse_plan) == ((2, 4, 4), [(2, 2, 2)] * 3)
    # SynthMR-like plan, total (4, 8, 8), first axis coarse: in-plane stem 4 as in every paper configuration,
    # the coarse axis keeps stride 1 in the stem and is halved at the two last stages
    synthmr_plan = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert map_topology(synthmr_plan) == ((1, 4, 4), [(1, 2, 2), (2, 2, 2), (2, 2, 2)])
    assert patch_divisor("unetrpp", synthmr_plan, 3) == (4, 32, 32)
    assert adjust_patch("unetrpp", (44, 56, 48), synthmr_plan, 3) == (44, 64, 64)
    # isotropic plan (BraTS-like 128^3, five 2x2x2 pools): the paper's BraTS stem (4, 4, 4)
    assert map_topology([[1, 1, 1]] + [[2, 2, 2]] * 5) == ((4, 4, 4), [(2, 2, 2)] * 3)
    assert patch_divisor("unetrpp", synapse_plan, 3) == (16, 32, 32)


def test_constraints_reject_invalid_patches():
    assert "3D only" in constraints("unetrpp", (64, 64), 2)[0]
    with pytest.raises(NetworkError, match=r"'unetrpp' cannot use patch \(60, 128, 128\).*divisible"):
        check_patch("unetrpp", (60, 128, 128), 3, stem_stride=(2, 4, 4))
    # a small patch is accepted as it is (the projection size is capped at the token count instead) as long as
    # its bottleneck holds 2 voxels
    assert constraints("unetrpp", (32, 32, 32), 3, stem_stride=(2, 4, 4)) == []
    assert adjust_patch("unetrpp", (32, 32, 32), IGNORED["strides"], 3, stem_stride=(2, 4, 4)) == (32, 32, 32)
    # one bottleneck voxel is refused, and the nearest accepted patch given instead
    assert "bottleneck (1, 1, 1) holds fewer than 2 voxels" in constraints(
        "unetrpp", (16, 32, 32), 3, stem_stride=(2, 4, 4))[0]
    assert adjust_patch("unetrpp", (16, 32, 32), IGNORED["strides"], 3, stem_stride=(2, 4, 4)) == (32, 32, 32)


def test_a_one_voxel_bottleneck_really_fails_a_training_step_on_one_sample():
    # why the constraint exists: DDP gives each of 2 GPUs one sample of a batch of 2, and batch norm in
    # training refuses one value per channel (the network is built directly, past the registry's check)
    from autoseg.networks.unetrpp import UNETRPlusPlus

    stages = [(2, 2, 2)] * 3
    one_voxel = UNETRPlusPlus(1, 2, (16, 32, 32), (2, 4, 4), stages, deep_supervision=False).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        one_voxel(torch.zeros(1, 1, 16, 32, 32))
    two_voxels = UNETRPlusPlus(1, 2, (32, 32, 32), (2, 4, 4), stages, deep_supervision=False).train()
    assert tuple(two_voxels(torch.zeros(1, 1, 32, 32, 32)).shape) == (1, 2, 32, 32, 32)


def test_projection_is_capped_at_the_token_count_for_small_patches():
    from autoseg.networks.unetrpp import projection_size

    assert projection_size(64, 4096) == 64 and projection_size(64, 16) == 16
    model = build(NetworkSpec("unetrpp", 1, 3, patch_size=(32, 64, 64), **IGNORED, options=dict(stem_stride=(2, 4, 4))))
    projections = [m.project_keys.out_features for m in model.modules() if hasattr(m, "project_keys")]
    tokens = [m.project_keys.in_features for m in model.modules() if hasattr(m, "project_keys")]
    assert min(tokens) < 32 and all(p == min(64, n) or p == min(32, n) for p, n in zip(projections, tokens))
    out = model(torch.randn(2, 1, 32, 64, 64))
    assert tuple(out[0].shape) == (2, 3, 32, 64, 64)


def _reference_epa(attention, x):
    """EPA written out from architectures.md 3.3 with explicit softmaxes, as an independent check."""
    b, n, c = x.shape
    h = attention.heads
    d = c // h
    q, k, v_c, v_s = attention.qkvv(x).reshape(b, n, 4, h, d).permute(2, 0, 3, 1, 4)  # each B,h,N,d
    k_p = attention.project_keys(k.transpose(-2, -1))  # B,h,d,p from un-normalised keys
    v_p = attention.project_values(v_s.transpose(-2, -1))
    qn = torch.nn.functional.normalize(q, dim=-2)  # along tokens
    kn = torch.nn.functional.normalize(k, dim=-2)
    channel = torch.softmax(qn.transpose(-2, -1) @ kn * attention.temperature_channel, dim=-1)  # B,h,d,d
    x_c = (channel @ v_c.transpose(-2, -1)).permute(0, 3, 1, 2).reshape(b, n, c)
    spatial = torch.softmax(qn @ k_p * attention.temperature_spatial, dim=-1)  # B,h,N,p
    x_s = (spatial @ v_p.transpose(-2, -1)).permute(0, 2, 1, 3).reshape(b, n, c)
    if attention.fusion == "concat":
        return torch.cat([attention.out_spatial(x_s), attention.out_channel(x_c)], dim=-1)
    return x_s + x_c


@pytest.mark.parametrize("variant", ["synapse", "acdc", "brats"])
def test_epa_matches_explicit_formulas(variant):
    net = build(NetworkSpec("unetrpp", 1, 2, **TINY, **IGNORED, options=dict(TINY_OPTIONS, variant=variant))).eval()
    attention = net.encoder[1][0].attention
    with torch.no_grad():
        attention.temperature_spatial.uniform_(0.5, 2.0)  # distinct per-head temperatures
        attention.temperature_channel.uniform_(0.5, 2.0)
        x = torch.randn(2, 8 * 8 * 8, 64)
        assert torch.allclose(attention(x), _reference_epa(attention, x), atol=1e-5)
    shared = attention.project_keys is attention.project_values
    assert shared == (variant != "acdc")
