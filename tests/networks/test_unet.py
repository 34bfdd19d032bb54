import pytest
import torch

from autoseg.networks import NetworkSpec, build
from autoseg.networks.summary import count_parameters

from .tiny_plans import TINY_2D, TINY_3D


@pytest.mark.parametrize("plan", [TINY_3D, TINY_2D], ids=["3d", "2d"])
def test_forward_backward_and_deep_supervision_shapes(plan):
    net = build(NetworkSpec("unet", 2, 3, deep_supervision=True, **plan))
    x = torch.randn(2, 2, *plan["patch_size"])
    outputs = net(x)
    # one output per decoder stage, highest resolution first, at 1/cumprod(strides)
    assert len(outputs) == len(plan["features"]) - 1 == len(net.ds_scales) == len(net.ds_weights)
    for out, scale in zip(outputs, net.ds_scales):
        expected = tuple(round(p * s) for p, s in zip(plan["patch_size"], scale))
        assert out.shape == (2, 3, *expected)
    assert net.ds_scales[0] == (1.0,) * len(plan["patch_size"])
    assert net.ds_scales[1] == tuple(1.0 / s for s in plan["strides"][1])
    sum(o.float().pow(2).mean() for o in outputs).backward()
    assert all(p.grad is not None for p in net.encoder.parameters())


def test_ds_weights_follow_nnunet():
    net = build(NetworkSpec("unet", 1, 2, (16, 16, 16), [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, [4, 8, 16, 32]))
    # 1, 1/2, 0 (lowest ignored) normalised
    assert net.ds_weights == pytest.approx([2 / 3, 1 / 3, 0.0])


@pytest.mark.parametrize("plan", [TINY_3D, TINY_2D], ids=["3d", "2d"])
def test_without_deep_supervision_returns_full_resolution_logits(plan):
    net = build(NetworkSpec("unet", 1, 4, deep_supervision=False, **plan)).eval()
    out = net(torch.randn(1, 1, *plan["patch_size"]))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 4, *plan["patch_size"])


def test_features_for_selfreg():
    net = build(NetworkSpec("unet", 1, 2, **TINY_3D))
    outputs, features = net(torch.randn(1, 1, *TINY_3D["patch_size"]), return_features=True)
    assert len(outputs) == 2
    assert [f.shape[1] for f in features["encoder"]] == [8, 16]  # stages 1..n-1
    assert [f.shape[1] for f in features["decoder"]] == [8]
    assert features["final"].shape == (1, 4, *TINY_3D["patch_size"])


def test_meta_device_forward():
    with torch.device("meta"):
        net = build(NetworkSpec("unet", 1, 2, **TINY_3D))
        outputs = net(torch.zeros(2, 1, *TINY_3D["patch_size"]))
    assert outputs[0].device.type == "meta" and outputs[0].shape == (2, 2, *TINY_3D["patch_size"])


def test_params_3d_published_configuration():
    # architectures.md 6.3: nnU-Net 3D, 6 stages 32..320, 1 in, 14 classes, DS heads included: 31.21 M
    with torch.device("meta"):
        net = build(NetworkSpec("unet", 1, 14, (128, 128, 128), [[1, 1, 1]] + [[2, 2, 2]] * 5, [[3, 3, 3]] * 6,
                                [32, 64, 128, 256, 320, 320]))
    assert abs(count_parameters(net) - 31.21e6) / 31.21e6 < 0.01


def test_params_2d_published_configuration():
    # architectures.md section 1: 2D, 7 stages 32..512, 4 classes: 33.47 M
    with torch.device("meta"):
        net = build(NetworkSpec("unet", 1, 4, (512, 512), [[1, 1]] + [[2, 2]] * 6, [[3, 3]] * 7,
                                [32, 64, 128, 256, 512, 512, 512]))
    assert abs(count_parameters(net) - 33.47e6) / 33.47e6 < 0.01


def test_params_original_2d_unet():
    # architectures.md 6.3: the original 2D U-Net (UNet++ paper's baseline, filters 32..512, 1 in, 1 class,
    # no normalisation): 7,759,521. Assumption: that network has a single head, while ours always builds a
    # head per decoder stage (nnU-Net does); subtracting the 3 extra 1x1 heads gives an exact match.
    with torch.device("meta"):
        net = build(NetworkSpec("unet", 1, 1, (256, 256), [[1, 1]] + [[2, 2]] * 4, [[3, 3]] * 5,
                                [32, 64, 128, 256, 512], deep_supervision=False, options=dict(norm="none", activation="relu")))
    extra_heads = sum(count_parameters(h) for h in list(net.heads)[:-1])
    assert count_parameters(net) - extra_heads == 7_759_521


def test_anisotropic_kernel_one_axis_is_really_one():
    net = build(NetworkSpec("unet", 1, 2, **TINY_3D))
    first_conv = net.encoder[0][0][0]
    assert tuple(first_conv.kernel_size) == (1, 3, 3) and tuple(first_conv.padding) == (0, 1, 1)
    assert tuple(net.encoder[1][0][0].stride) == (1, 2, 2)
