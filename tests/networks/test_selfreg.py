import pytest
import torch

from autoseg.networks import NetworkSpec, adjust_patch, available, build, get
from autoseg.networks.selfreg import (
    internal_distillation_loss,
    selfreg_loss,
    semantic_consistency_loss,
)

from .tiny_plans import TINY_3D


def test_identical_channels_give_zero_distillation_loss():
    channel = torch.randn(2, 1, 4, 5, 6)
    assert internal_distillation_loss(channel.repeat(1, 6, 1, 1, 1)) == 0


def test_distillation_pairs_high_with_low_scoring_channels_by_hand():
    # channel scores (mean of L2-normalised maps): constant maps of any positive value score 1/sqrt(n),
    # so make scores distinct with maps of different shape: [1, 0, 0, 0] scores 1/4, [1, 1, 1, 1] scores 1/2
    peaked = torch.tensor([1.0, 0.0, 0.0, 0.0])
    flat = torch.tensor([3.0, 3.0, 3.0, 3.0])
    feature = torch.stack([peaked, flat])[None]  # 1, 2, 4
    # ranking: flat (0.5) first, peaked (0.25) second -> MSE(flat, peaked) = ((2)^2 + 3 * 3^2) / 4
    assert internal_distillation_loss(feature).item() == pytest.approx((4 + 27) / 4)


def test_distillation_odd_channel_count_and_gradients_flow_to_both_halves():
    feature = torch.randn(2, 5, 3, 3, requires_grad=True)
    internal_distillation_loss(feature).backward()
    touched = (feature.grad.abs().sum(dim=(0, 2, 3)) > 0).sum().item()
    assert touched == 4  # two pairs; the lowest-ranked fifth channel is left out


def test_consistency_identical_maps_zero_and_teacher_detached():
    teacher = torch.randn(1, 1, 8, 8, 8).repeat(1, 4, 1, 1, 1).requires_grad_(True)
    student = teacher.detach().clone().requires_grad_(True)
    loss = semantic_consistency_loss(student, teacher)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    student2 = torch.randn(1, 4, 8, 8, 8, requires_grad=True)
    semantic_consistency_loss(student2, teacher).backward()
    assert student2.grad is not None and teacher.grad is None  # teacher receives no gradient


def test_consistency_pools_teacher_to_student_shape_per_axis():
    # a teacher constant per 2x4x4 block pooled onto a 4x2x2 student equals the block means exactly
    student = torch.arange(16.0).reshape(1, 1, 4, 2, 2)
    teacher = student.repeat_interleave(2, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)
    assert semantic_consistency_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-10)


def test_consistency_channel_pairing_is_random_and_seedable():
    student = torch.randn(2, 8, 4, 4)
    teacher = torch.randn(2, 3, 8, 8)
    a = semantic_consistency_loss(student, teacher, torch.Generator().manual_seed(1))
    b = semantic_consistency_loss(student, teacher, torch.Generator().manual_seed(1))
    others = {round(semantic_consistency_loss(student, teacher, torch.Generator().manual_seed(s)).item(), 6)
              for s in range(10)}
    assert a == b and len(others) > 1


def test_selfreg_loss_weights_by_hand():
    encoder = [torch.randn(1, 4, 4, 4)]
    decoder = [torch.randn(1, 6, 8, 8)]
    final = torch.randn(1, 2, 16, 16)
    features = {"encoder": encoder, "decoder": decoder, "final": final}
    generator = torch.Generator().manual_seed(0)
    loss = selfreg_loss(features, lambda_ifd=0.5, lambda_scr=2.0, generator=generator)
    generator = torch.Generator().manual_seed(0)
    scr = [semantic_consistency_loss(s, final, generator) for s in encoder + decoder]
    expected = 0.5 * (internal_distillation_loss(encoder[0]) + internal_distillation_loss(decoder[0])) \
        + 2.0 * (scr[0] + scr[1]) / 2
    assert loss.item() == pytest.approx(expected.item())
    assert selfreg_loss(features, lambda_ifd=0.0, lambda_scr=0.0).item() == 0.0


@pytest.mark.parametrize("name", ["unet", "unetpp"])
def test_selfreg_on_registered_networks_backpropagates(name):
    assert get(name).supports_selfreg
    net = build(NetworkSpec(name, 1, 2, **TINY_3D))
    outputs, features = net(torch.randn(2, 1, *TINY_3D["patch_size"]), return_features=True)
    loss = selfreg_loss(features, generator=torch.Generator().manual_seed(0))
    assert loss.item() > 0
    loss.backward()
    assert net.encoder[1][0][0].weight.grad is not None if name == "unet" else True


def test_every_selfreg_architecture_returns_the_feature_dict():
    # the protocol of registry.py, checked on meta for every registered architecture that claims it
    plans = {
        3: dict(patch_size=(32, 64, 64), strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 4, features=[8, 16, 32, 64, 64]),
        2: dict(patch_size=(64, 64), strides=[[1, 1]] + [[2, 2]] * 3, kernel_sizes=[[3, 3]] * 4,
                features=[8, 16, 32, 64]),
    }
    assert {"unet", "unetpp", "unet2022", "unetrpp"} <= set(available())
    for name in available():
        if not get(name).supports_selfreg:
            continue
        for dims in get(name).dims:
            plan = dict(plans[dims])
            plan["patch_size"] = adjust_patch(name, plan["patch_size"], plan["strides"], dims)
            with torch.device("meta"):
                net = build(NetworkSpec(name, 1, 2, **plan))
                _, features = net(torch.zeros(1, 1, *plan["patch_size"]), return_features=True)
                loss = selfreg_loss(features)
            assert features["encoder"] and features["decoder"], name
            assert all(f.ndim == dims + 2 for f in features["encoder"] + features["decoder"]), name
            # the teacher is the finest decoder map: no other map is larger on any axis
            final = features["final"].shape[2:]
            assert all(all(a <= b for a, b in zip(f.shape[2:], final))
                       for f in features["encoder"] + features["decoder"]), name
            assert loss.shape == ()
