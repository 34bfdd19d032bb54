import json

import pytest
import torch

from autoseg import networks
from autoseg.networks import NetworkError, NetworkSpec, build
from autoseg.networks.blocks import ResidualBlock
from autoseg.networks.resenc import default_blocks_per_stage
from autoseg.networks.summary import count_parameters

from .tiny_plans import TINY_2D, TINY_3D


def test_blocks_per_stage_follow_nnunet_and_truncate():
    assert default_blocks_per_stage(2) == [1, 3]
    assert default_blocks_per_stage(4) == [1, 3, 4, 6]
    assert default_blocks_per_stage(7) == [1, 3, 4, 6, 6, 6, 6]


@pytest.mark.parametrize("plan", [TINY_3D, TINY_2D], ids=["3d", "2d"])
def test_forward_backward_and_deep_supervision_shapes(plan):
    net = build(NetworkSpec("resenc", 2, 3, deep_supervision=True, **plan))
    x = torch.randn(2, 2, *plan["patch_size"])
    outputs = net(x)
    assert len(outputs) == len(plan["features"]) - 1 == len(net.ds_scales) == len(net.ds_weights)
    for out, scale in zip(outputs, net.ds_scales):
        expected = tuple(round(p * s) for p, s in zip(plan["patch_size"], scale))
        assert out.shape == (2, 3, *expected)
    assert net.ds_scales[1] == tuple(1.0 / s for s in plan["strides"][1])
    assert net.ds_weights == pytest.approx([1.0, 0.0])  # 1, 1/2 -> lowest 0, normalised (as unet)
    sum(o.float().pow(2).mean() for o in outputs).backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("plan", [TINY_3D, TINY_2D], ids=["3d", "2d"])
def test_without_deep_supervision_returns_full_resolution_logits(plan):
    net = build(NetworkSpec("resenc", 1, 4, deep_supervision=False, **plan)).eval()
    out = net(torch.randn(1, 1, *plan["patch_size"]))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 4, *plan["patch_size"])


def test_encoder_is_residual_with_the_stride_in_the_first_block():
    net = build(NetworkSpec("resenc", 1, 2, **TINY_3D))
    assert [len(stage) for stage in net.encoder] == [1, 3, 4][: len(TINY_3D["features"])]
    first = net.encoder[1][0]
    assert isinstance(first, ResidualBlock)
    assert tuple(first.conv1[0].stride) == (1, 2, 2) and tuple(net.encoder[1][1].conv1[0].stride) == (1, 1, 1)
    # stage 0 keeps the stem's channels and resolution: identity skip; stage 1 pools and projects
    assert len(net.encoder[0][0].skip) == 0
    assert [type(m).__name__ for m in first.skip] == ["AvgPool3d", "Conv3d", "InstanceNorm3d"]
    # kernel 1 on the coarse axis where the plan says so
    assert tuple(net.stem[0].kernel_size) == (1, 3, 3) and tuple(net.stem[0].padding) == (0, 1, 1)
    # one conv block per decoder stage
    assert all(sum(isinstance(m, torch.nn.Conv3d) for m in stage.modules()) == 1 for stage in net.decoder)


def test_residual_block_starts_as_its_skip():
    # the last norm starts at zero, so a fresh block returns act(skip(x)): an identity block is LeakyReLU(x)
    block = ResidualBlock(3, 4, 4, (3, 3, 3))
    x = torch.randn(2, 4, 6, 6, 6)
    assert torch.allclose(block(x), torch.nn.functional.leaky_relu(x, 0.01), atol=1e-6)


def test_a_block_that_keeps_channels_but_strides_only_pools():
    block = ResidualBlock(2, 8, 8, (3, 3), stride=(2, 2))
    assert [type(m).__name__ for m in block.skip] == ["AvgPool2d"]
    assert block(torch.randn(1, 8, 8, 6)).shape == (1, 8, 4, 3)


def test_blocks_per_stage_option_and_its_validation():
    net = build(NetworkSpec("resenc", 1, 2, **TINY_2D, options=dict(blocks_per_stage=[2, 2, 1])))
    assert [len(stage) for stage in net.encoder] == [2, 2, 1]
    with pytest.raises(ValueError, match="one entry >= 1 per stage"):
        build(NetworkSpec("resenc", 1, 2, **TINY_2D, options=dict(blocks_per_stage=[1, 1])))


def test_features_for_selfreg():
    net = build(NetworkSpec("resenc", 1, 2, **TINY_3D))
    outputs, features = net(torch.randn(1, 1, *TINY_3D["patch_size"]), return_features=True)
    assert len(outputs) == 2
    assert [f.shape[1] for f in features["encoder"]] == [8, 16]
    assert [f.shape[1] for f in features["decoder"]] == [8]
    assert features["final"].shape == (1, 4, *TINY_3D["patch_size"])


def test_constraints_as_the_plain_unet():
    strides = TINY_3D["strides"]
    assert networks.constraints("resenc", (8, 16, 12), 3, strides=strides) == []
    problems = networks.constraints("resenc", (8, 16, 10), 3, strides=strides)
    assert problems and "not divisible by 4" in problems[0]
    # one bottleneck voxel: instance norm has one value per channel
    assert "bottleneck" in networks.constraints("resenc", (2, 4, 4), 3, strides=strides)[0]
    assert networks.patch_divisor("resenc", strides, 3) == (2, 4, 4)
    with pytest.raises(NetworkError, match="resenc"):
        build(NetworkSpec("resenc", 1, 2, (8, 16, 10), strides, TINY_3D["kernel_sizes"], TINY_3D["features"]))


# nnU-Net 2.8.1's ResidualEncoderUNet built with the same plan and counted by benchmarks/resenc_parameters.py
# (arguments as nnU-Net's ResEnc planners write them): our network has the same blocks, convs, biases and
# norm affines, so the counts must be identical, not just close.
@pytest.mark.parametrize("args,expected", [
    ((1, 14, (128, 128, 128), [[1, 1, 1]] + [[2, 2, 2]] * 5, [[3, 3, 3]] * 6, [32, 64, 128, 256, 320, 320]),
     102_359_430),
    ((1, 4, (512, 512), [[1, 1]] + [[2, 2]] * 6, [[3, 3]] * 7, [32, 64, 128, 256, 512, 512, 512]), 105_919_832),
    ((1, 3, (20, 192, 160), [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
      [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], [32, 64, 128, 256, 320]), 62_142_188),
    ((1, 3, (8, 16, 12), TINY_3D["strides"], TINY_3D["kernel_sizes"], TINY_3D["features"]), 67_426),
], ids=["3d-6-stages", "2d-7-stages", "3d-anisotropic", "tiny-3d"])
def test_parameter_count_equals_nnunets(args, expected):
    with torch.device("meta"):
        net = build(NetworkSpec("resenc", *args))
    assert count_parameters(net) == expected


def test_meta_device_forward():
    with torch.device("meta"):
        net = build(NetworkSpec("resenc", 1, 2, **TINY_3D))
        outputs = net(torch.zeros(2, 1, *TINY_3D["patch_size"]))
    assert outputs[0].device.type == "meta" and outputs[0].shape == (2, 2, *TINY_3D["patch_size"])


@pytest.mark.parametrize("dims", [2, 3])
def test_trains_through_the_trainer(tmp_path, dims):
    """A tiny preprocessed dataset with a resenc configuration, 2 iterations through autoseg.training.train."""
    from autoseg.training import train
    from autoseg.contracts.checkpoint import load_checkpoint
    from tests.training.tiny_data import DATASET, build_tiny_dataset

    name = f"{'2d' if dims == 2 else '3d_fullres'}_resenc"
    build_tiny_dataset(tmp_path, dims=dims, num_cases=5, extra_configurations=[(name, "resenc")])
    folder = train(DATASET, name, 0, root=tmp_path, epochs=1, iterations_per_epoch=2, num_workers=0,
                   validate=False, device="cpu", validation_iterations=1)
    checkpoint = load_checkpoint(folder / "checkpoint_final.pt")
    assert checkpoint["metadata"]["architecture"] == "resenc"
    assert any(key.startswith("encoder.1.2.") for key in checkpoint["network"])  # stage 1 has 3 blocks
    curves = json.loads((folder / "training_log.json").read_text())
    assert len(curves["train_loss"]) == 1 and all(map(torch.isfinite, torch.tensor(curves["train_loss"])))
