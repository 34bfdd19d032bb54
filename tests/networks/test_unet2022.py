import pytest
import torch

from autoseg.networks import (
    NetworkError,
    NetworkSpec,
    adjust_patch,
    build,
    check_patch,
    constraints,
    patch_divisor,
)
from autoseg.networks.summary import count_parameters
from autoseg.networks.unet2022 import default_windows

IGNORED = dict(strides=[[1, 1], [2, 2]], kernel_sizes=[[3, 3], [3, 3]], features=[32, 64])


def test_forward_backward_tiny_non_square():
    # embed 32 -> heads 1, 2, 4, 8; patch 64x32 with stem 4 -> stages 16x8 .. 2x1
    net = build(NetworkSpec("unet2022", 2, 3, (64, 32), **IGNORED, options=dict(embed_dim=32))).train()
    outputs = net(torch.randn(2, 2, 64, 32))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 64, 32), (2, 3, 32, 16), (2, 3, 16, 8)]
    assert net.ds_scales == [(1.0, 1.0), (0.5, 0.5), (0.25, 0.25)]
    assert net.ds_weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    sum(o.pow(2).mean() for o in outputs).backward()
    assert net.stem[0].weight.grad is not None


def test_shifted_windows_with_stem_8():
    # 128x128, stem 8: stages 16, 8, 4, 2; windows 4 at stages 0-1 -> the middle block of each is shifted
    net = build(NetworkSpec("unet2022", 1, 2, (128, 128), deep_supervision=False, **IGNORED,
                            options=dict(embed_dim=32, stem=8, windows=[4, 4, 4, 2]))).eval()
    assert net.encoder[0][1][1].shift == (2, 2) and net.encoder[0][0][1].shift == (0, 0)
    out = net(torch.randn(1, 1, 128, 128))
    assert out.shape == (1, 2, 128, 128) and torch.isfinite(out).all()


def test_window_attention_is_local():
    # a change in one window must not reach another window through the (unshifted) attention sub-block
    net = build(NetworkSpec("unet2022", 1, 2, (64, 64), **IGNORED,
                            options=dict(embed_dim=32, windows=[4, 4, 4, 2]))).eval()
    block = net.encoder[0][0][1]
    x = torch.randn(1, 32, 16, 16)
    y = x.clone()
    # a perturbation that varies across channels (a constant one would vanish in the LayerNorm)
    y[:, :, 0, 0] += 5.0 * torch.randn(32)
    with torch.no_grad():
        delta = (block(y) - block(x)).abs().sum(1)[0]
    # attention spreads it over the whole 4x4 window; the 7x7 depthwise conv reaches 3 pixels; beyond both
    # nothing changes
    assert (delta[:4, :4] > 1e-6).all() and delta[8:, :].sum() == 0 and delta[:, 8:].sum() == 0


def test_shifted_window_mask_blocks_wrapped_neighbours():
    # after the cyclic shift, pixel (0, 0) and pixel (15, 15) share the bottom-right window but come from
    # opposite image corners: the -100 mask must keep them from attending to each other (Swin, section 2.3)
    net = build(NetworkSpec("unet2022", 1, 2, (64, 64), **IGNORED,
                            options=dict(embed_dim=32, windows=[4, 4, 4, 2]))).eval()
    block = net.encoder[0][1][1]
    assert block.shift == (2, 2)
    with torch.no_grad():
        block.depthwise.weight.zero_()  # isolate the attention branch (the depthwise conv sees the rolled map)
        block.depthwise.bias.zero_()
        x = torch.randn(1, 32, 16, 16)
        y = x.clone()
        y[:, :, 15, 15] += 5.0 * torch.randn(32)  # varies across channels, so it survives the LayerNorm
        changed = (block(y) - block(x)).abs().sum(1)[0] > 1e-6
    # only the 2x2 corner region (its real neighbours) sees it; without the mask (0, 0), (0, 15), (15, 0)
    # ... would change too
    assert sorted(changed.nonzero().tolist()) == [[14, 14], [14, 15], [15, 14], [15, 15]]


def test_published_parameter_count_and_shapes():
    # architectures.md 6.3: Synapse_224 Base (E 128, windows [7, 7, 14, 7], stem 4), 1 in, 9 classes
    assert default_windows((224, 224), 4) == [(7, 7), (7, 7), (14, 14), (7, 7)]
    with torch.device("meta"):
        net = build(NetworkSpec("unet2022", 1, 9, (224, 224), **IGNORED, options=dict(size="base")))
        outputs = net(torch.zeros(1, 1, 224, 224))
    assert count_parameters(net) == 72_929_187
    assert [tuple(o.shape[1:]) for o in outputs] == [(9, 224, 224), (9, 112, 112), (9, 56, 56)]


@pytest.mark.parametrize(
    "patch, options, in_channels, classes, expected",
    [  # the other repository configurations, architectures.md 2.9 [computed]
        ((320, 320), dict(size="tiny"), 1, 9, 41_329_665),
        ((224, 224), dict(size="large"), 1, 4, 163_080_024),
        ((512, 512), dict(size="tiny", stem=8, windows=[16, 16, 16, 8]), 1, 2, 42_065_940),
        ((512, 512), dict(size="tiny", stem=8, windows=[8, 8, 16, 8]), 3, 2, 42_026_628),
    ],
    ids=["synapse_320", "acdc_224", "em_512", "isic_512"],
)
def test_repository_configurations_parameter_counts(patch, options, in_channels, classes, expected):
    with torch.device("meta"):
        net = build(NetworkSpec("unet2022", in_channels, classes, patch, **IGNORED, options=options))
    assert count_parameters(net) == expected


def test_constraints():
    assert constraints("unet2022", (224, 224), 2) == []
    problems = constraints("unet2022", (16, 224, 224), 3)
    assert "2D only" in problems[0]
    with pytest.raises(NetworkError, match=r"'unet2022' cannot use patch \(200, 224\).*divisible by 8 \* stem = 32"):
        check_patch("unet2022", (200, 224), 2, strides=IGNORED["strides"])
    assert constraints("unet2022", (224, 224), 2, windows=[5, 7, 14, 7])  # 56 not a multiple of 5
    assert patch_divisor("unet2022", IGNORED["strides"], 2, stem=8) == (64, 64)
    assert adjust_patch("unet2022", (56, 48), IGNORED["strides"], 2) == (64, 64)
