import pytest
import torch

from autoseg.networks import NetworkError, NetworkSpec, build, check_patch
from autoseg.networks.summary import count_parameters

from .tiny_plans import TINY_2D, TINY_3D

ORIGINAL_FILTERS = [32, 64, 128, 256, 512]


def _original(depth: int, deep_supervision: bool = False):
    # architectures.md 4.1: original 2D UNet++ = max-pool down, ReLU, dropout 0.5, no normalisation
    with torch.device("meta"):
        return build(NetworkSpec("unetpp", 1, 1, (96, 96), [[1, 1]] + [[2, 2]] * depth, [[3, 3]] * (depth + 1),
                                 ORIGINAL_FILTERS[: depth + 1], deep_supervision=deep_supervision,
                                 options=dict(norm="none", activation="relu", dropout=0.5, downsample="maxpool")))


@pytest.mark.parametrize("plan", [TINY_3D, TINY_2D], ids=["3d", "2d"])
def test_forward_backward_all_heads_full_resolution(plan):
    net = build(NetworkSpec("unetpp", 2, 3, **plan)).train()
    outputs = net(torch.randn(2, 2, *plan["patch_size"]))
    depth = len(plan["features"]) - 1
    assert len(outputs) == depth == len(net.ds_scales)
    assert all(o.shape == (2, 3, *plan["patch_size"]) for o in outputs)  # top-row heads only
    assert net.ds_weights == pytest.approx([1 / depth] * depth)
    sum(o.pow(2).mean() for o in outputs).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_without_deep_supervision_single_output():
    net = build(NetworkSpec("unetpp", 1, 2, deep_supervision=False, **TINY_3D))
    assert net(torch.randn(1, 1, *TINY_3D["patch_size"])).shape == (1, 2, *TINY_3D["patch_size"])


def test_published_parameter_count_and_pruned_sizes():
    # architectures.md 6.3 / 4.2: UNet++ L4 with one head = 9,041,601 (Keras docstring); L1..L3 sub-networks
    assert count_parameters(_original(4)) == 9_041_601
    for depth, expected in [(1, 0.10e6), (2, 0.51e6), (3, 2.20e6)]:
        assert abs(count_parameters(_original(depth)) - expected) / expected < 0.1
    # each extra deep-supervision head adds 33 parameters (32 weights + bias)
    assert count_parameters(_original(4, deep_supervision=True)) == 9_041_601 + 3 * 33


def test_pruned_inference_computes_only_the_subnetwork():
    net = build(NetworkSpec("unetpp", 1, 2, **TINY_3D)).eval()
    x = torch.randn(1, 1, *TINY_3D["patch_size"])
    with torch.no_grad():
        full = net(x)
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o, k=key: calls.append(k)) for key, m in net.nodes.items()]
    net.prune(1)
    with torch.no_grad():
        pruned = net(x)
    for hook in hooks:
        hook.remove()
    assert sorted(calls) == ["0_0", "0_1", "1_0"]  # nodes with i + j <= 1
    # the pruned output is X[0][1]'s head, identical to that head in the full network's outputs
    assert torch.allclose(pruned[0], full[-1], atol=1e-5)
    with pytest.raises(ValueError, match="prune depth"):
        net.prune(5)


def test_pruning_needs_deep_supervision_heads():
    net = build(NetworkSpec("unetpp", 1, 2, deep_supervision=False, **TINY_3D))
    with pytest.raises(ValueError, match="deep_supervision"):
        net.prune(1)


def test_accurate_mode_averages_head_probabilities():
    net = build(NetworkSpec("unetpp", 1, 2, **TINY_2D, options=dict(inference_mode="accurate"))).eval()
    x = torch.randn(1, 1, *TINY_2D["patch_size"])
    with torch.no_grad():
        (logits,) = net(x)
        net.inference_mode = "fast"
        heads = net(x)
    expected = torch.stack([h.softmax(1) for h in heads]).mean(0)
    assert torch.allclose(logits.softmax(1), expected, atol=1e-5)


def test_features_and_constraints():
    net = build(NetworkSpec("unetpp", 1, 2, **TINY_3D))
    _, features = net(torch.randn(1, 1, *TINY_3D["patch_size"]), return_features=True)
    assert len(features["encoder"]) == 2  # X[1][0], X[2][0]
    assert len(features["decoder"]) == 2  # X[1][1], X[0][1]; X[0][2] is final
    assert features["final"].shape[1] == TINY_3D["features"][0]
    with pytest.raises(NetworkError, match="unetpp.*not divisible"):
        check_patch("unetpp", (8, 16, 10), 3, strides=TINY_3D["strides"])


def test_meta_forward():
    with torch.device("meta"):
        net = build(NetworkSpec("unetpp", 1, 2, **TINY_3D))
        outputs = net(torch.zeros(1, 1, *TINY_3D["patch_size"]))
    assert outputs[0].shape == (1, 2, *TINY_3D["patch_size"])
