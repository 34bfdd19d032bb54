import functools
import math

import pytest
import torch

from autoseg.errors import ConfigurationError
from autoseg.training.losses import (
    deep_supervision_loss,
    deep_supervision_weights,
    dice_ce_loss,
    soft_dice_per_class,
)
from autoseg.training.schedule import parse_duration, poly_lr, training_progress


def test_soft_dice_matches_hand_computation():
    # two classes, 4 pixels; logits so that softmax gives p(fg) = [0.9, 0.9, 0.1, 0.5]
    p = torch.tensor([0.9, 0.9, 0.1, 0.5])
    logits = torch.stack([torch.zeros(4), torch.log(p / (1 - p))]).reshape(1, 2, 2, 2)
    target = torch.tensor([1, 1, 0, 0]).reshape(1, 1, 2, 2)
    # intersection 1.8, sum p 2.4, sum g 2
    expected = (2 * 1.8 + 1e-5) / (2.4 + 2 + 1e-5)
    got = soft_dice_per_class(logits, target, batch_dice=False)
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    ce = -(math.log(0.9) * 2 + math.log(0.9) + math.log(0.5)) / 4
    assert dice_ce_loss(logits, target, batch_dice=False).item() == pytest.approx(ce + 1 - expected, rel=1e-5)


def test_batch_dice_pools_the_batch_and_excludes_background():
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 1] = 10.0  # sample 0 predicts class 1 everywhere
    target = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    target[0] = 1  # sample 0 is all class 1; sample 1 all background
    per_sample = soft_dice_per_class(logits, target, batch_dice=False)
    pooled = soft_dice_per_class(logits, target, batch_dice=True)
    assert per_sample.shape == (2, 2) and pooled.shape == (2,)
    assert per_sample[0, 0].item() == pytest.approx(1.0, abs=1e-3)
    # sample 1 has no class 1 and predicts 1/3 probability each: Dice near 0, pooled Dice 2*16/(16+16+16/3*...) 
    p1 = torch.softmax(torch.zeros(3), 0)[1].item()
    inter = 16 * torch.softmax(torch.tensor([0.0, 10.0, 0.0]), 0)[1].item()
    expected = 2 * inter / (inter + 16 * p1 + 16)
    assert pooled[0].item() == pytest.approx(expected, rel=1e-4)


def test_deep_supervision_weights_and_loss():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(4) == pytest.approx([8 / 14, 4 / 14, 2 / 14, 0.0])
    torch.manual_seed(0)
    outs = [torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)]
    targets = [torch.randint(0, 2, (1, 1, 8, 8)), torch.randint(0, 2, (1, 1, 4, 4)), torch.randint(0, 2, (1, 1, 2, 2))]
    expected = (2 / 3) * dice_ce_loss(outs[0], targets[0], False) + (1 / 3) * dice_ce_loss(outs[1], targets[1], False)
    assert deep_supervision_loss(outs, targets, functools.partial(dice_ce_loss, batch_dice=False)).item() == pytest.approx(expected.item(), rel=1e-6)


def test_poly_and_progress():
    assert poly_lr(0.01, 0.0) == 0.01
    assert poly_lr(0.01, 0.5) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 1.5) == 0.0
    assert training_progress(10, 100) == pytest.approx(0.1)
    assert training_progress(1, None, 30.0, 60.0) == pytest.approx(0.5)
    assert training_progress(90, 100, 30.0, 60.0) == pytest.approx(0.9)  # whichever limit is nearer


@pytest.mark.parametrize("text,seconds", [("20m", 1200), ("1h30m", 5400), ("23h", 82800), ("90s", 90), (2.5, 2.5),
                                          ("1H5S", 3605)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "20 minutes", "m20", "-5m", "0s", "1h-3m"])
def test_parse_duration_rejects(text):
    with pytest.raises(ConfigurationError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["2", "2.5", " 90 "])
def test_a_bare_number_on_the_command_line_needs_a_unit(text):
    """`--time-budget 2` used to mean 2 seconds; people mean hours or minutes."""
    with pytest.raises(ConfigurationError, match="give a unit"):
        parse_duration(text)


def test_loss_registry_builds_the_reference_loss_and_names_choices():
    from autoseg.training.losses import LossContext, available_losses, build_loss

    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8)).float()
    for batch_dice in (False, True):
        loss = build_loss("dice_ce", LossContext(dims=2, num_outputs=3, batch_dice=batch_dice))
        assert loss(logits, target).item() == pytest.approx(dice_ce_loss(logits, target, batch_dice).item())
    assert "dice_ce" in available_losses()
    with pytest.raises(ConfigurationError, match="unknown loss; choose one of .*dice_ce"):
        build_loss("focal", LossContext(dims=2, num_outputs=3, batch_dice=False))


def test_schedule_registry_poly_and_warmup():
    from autoseg.training.schedule import available_schedules, build_schedule

    poly = build_schedule("poly")
    assert [poly.lr(p) for p in (0.0, 0.5, 1.0)] == [0.01, pytest.approx(0.01 * 0.5**0.9), 0.0]
    assert poly.to_json() == {"kind": "poly", "initial_lr": 0.01, "exponent": 0.9}
    warm = build_schedule("poly-warmup")
    assert warm.lr(0.0) == 0.0 and warm.lr(0.025) == pytest.approx(0.005)  # halfway through the 5 % warm-up
    assert warm.lr(0.05) == pytest.approx(0.01) and warm.lr(1.0) == 0.0
    assert warm.lr(0.525) == pytest.approx(poly.lr(0.5))  # after warm-up: poly over the remaining 95 %
    assert set(available_schedules()) >= {"poly", "poly-warmup"}
    with pytest.raises(ConfigurationError, match="choose one of poly, poly-warmup"):
        build_schedule("cosine")


@pytest.mark.parametrize("name,regions", [("dice_ce", None), ("dice_bce", ((1, 2), (2,)))])
def test_ignore_voxels_get_no_loss(name, regions):
    """Issue 20.3: whatever the network predicts where the label is `ignore`, loss and gradient there are 0."""
    from autoseg.training.losses import LossContext, build_loss

    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 6, 6)).float()
    target[:, :, :3] = 3  # the ignore label (max + 1) on half of every patch
    loss = build_loss(name, LossContext(dims=2, num_outputs=2 if regions else 3, batch_dice=False, ignore_label=3,
                                        regions=regions))
    logits = torch.randn(2, 2 if regions else 3, 6, 6, requires_grad=True)
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value) and logits.grad[:, :, :3].abs().max() == 0 and logits.grad[:, :, 3:].abs().max() > 0
    changed = logits.detach().clone()
    changed[:, :, :3] = torch.randn_like(changed[:, :, :3]) * 10
    assert loss(changed, target).item() == pytest.approx(value.item(), rel=1e-6)
    assert torch.isfinite(loss(logits, torch.full_like(target, 3)))  # a patch with nothing annotated: no NaN


def test_region_loss_is_bce_plus_soft_dice_of_region_masks():
    from autoseg.training.losses import LossContext, build_loss, default_loss, region_masks

    regions = ((1, 2, 3), (2, 3), (3,))
    target = torch.tensor([[[[0, 1, 2, 3]]]]).float()
    logits = torch.tensor([[[[-2.0, 1.0, 2.0, 0.5]], [[-1.0, -1.0, 1.0, 2.0]], [[0.0, -3.0, -1.0, 3.0]]]])
    truth = region_masks(target, regions)
    p = torch.sigmoid(logits)
    bce = torch.nn.functional.binary_cross_entropy(p, truth)
    dice = ((2 * (p * truth).sum((2, 3)) + 1e-5) / (p.sum((2, 3)) + truth.sum((2, 3)) + 1e-5)).mean()
    context = LossContext(dims=2, num_outputs=3, batch_dice=False, regions=regions)
    assert default_loss(context) == "dice_bce"
    assert build_loss("dice_bce", context)(logits, target).item() == pytest.approx((bce + 1 - dice).item(), rel=1e-5)
    with pytest.raises(ConfigurationError, match="--loss dice_bce"):
        build_loss("dice_ce", context)
