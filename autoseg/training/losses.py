"""Losses: soft Dice + cross-entropy (classes), soft Dice + BCE (regions), and the deep-supervision weighting.

Numbers from the nnU-Net method (Isensee et al., Nature Methods 2021): Dice over foreground
classes only (background excluded), smooth 1e-5, batch Dice for 2D configurations (the sums run over the
batch as well as space), Dice and CE weighted 1 each; deep-supervision weights 1/2^i, lowest resolution
excluded, normalised to sum 1.

Regions (nnU-Net 2.x): one sigmoid output per region, BCE + soft Dice over every region. The ignore label:
its voxels are left out of CE/BCE and of the Dice sums. Both are registered losses (``--loss``), chosen by
default from the dataset kind (:func:`default_loss`).

We report the Dice term as ``1 - mean Dice`` (non-negative, 0 = perfect); the reference uses ``-mean Dice``.
The gradients are identical, only the logged value is shifted by one.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from autoseg.errors import ConfigurationError

DICE_SMOOTH = 1e-5  # nnU-Net's smooth term: keeps empty classes from giving 0/0


def soft_dice(probabilities: torch.Tensor, truth: torch.Tensor, batch_dice: bool,
              mask: torch.Tensor | None = None, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice per channel: ``(2 * sum p*g + smooth) / (sum p + sum g + smooth)``.

    probabilities, truth: ``[B, C, *spatial]`` in [0, 1]; ``mask`` ``[B, 1, *spatial]`` (1 = annotated) leaves
    voxels out of every sum (the ignore label). Returns ``[C]`` when ``batch_dice`` else ``[B, C]``.
    """
    if mask is not None:
        probabilities, truth = probabilities * mask, truth * mask
    axes = tuple(range(2, probabilities.ndim))
    if batch_dice:
        axes = (0, *axes)
    intersection = (probabilities * truth).sum(axes)
    denominator = probabilities.sum(axes) + truth.sum(axes)
    return (2.0 * intersection + smooth) / torch.clamp(denominator + smooth, min=1e-8)


def soft_dice_per_class(
    logits: torch.Tensor, target: torch.Tensor, batch_dice: bool, smooth: float = DICE_SMOOTH,
    ignore_label: int | None = None,
) -> torch.Tensor:
    """Soft Dice of each foreground class.

    logits: ``[B, K, *spatial]`` (K classes incl. background); target: ``[B, 1, *spatial]`` integer labels.
    Returns ``[K-1]`` when ``batch_dice`` else ``[B, K-1]`` (:func:`soft_dice` of the softmax probabilities and
    the one-hot target); voxels labelled ``ignore_label`` count nowhere.
    """
    probabilities = torch.softmax(logits.float(), dim=1)[:, 1:]
    num_classes = logits.shape[1]
    labels = target[:, 0].long()
    one_hot = torch.stack([(labels == k) for k in range(1, num_classes)], dim=1).to(probabilities.dtype)
    mask = annotated_mask(target, ignore_label)
    return soft_dice(probabilities, one_hot, batch_dice, mask, smooth)


def annotated_mask(target: torch.Tensor, ignore_label: int | None) -> torch.Tensor | None:
    """``[B, 1, *S]`` float, 1 where the target is annotated (not ``ignore_label``); None without an ignore label."""
    if ignore_label is None:
        return None
    return (target != ignore_label).float()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the annotated voxels; 0 when a patch has none (a mean over nothing is NaN,
    which would stop training, while such a patch simply teaches nothing)."""
    if mask is None:
        return values.mean()
    mask = mask.expand_as(values)
    return (values * mask).sum() / torch.clamp(mask.sum(), min=1.0)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool,
                 ignore_label: int | None = None) -> torch.Tensor:
    """``CE + (1 - mean foreground soft Dice)``; logits ``[B, K, *S]``, target ``[B, 1, *S]`` -> scalar.
    Voxels labelled ``ignore_label`` get no loss: left out of the CE mean and of the Dice sums."""
    labels = target[:, 0].long()
    mask = annotated_mask(target, ignore_label)
    if mask is None:
        ce = F.cross_entropy(logits.float(), labels)
    else:
        # the ignore value is not a class of the network: any in-range stand-in, its loss is masked out
        per_voxel = F.cross_entropy(logits.float(), torch.where(labels == ignore_label, 0, labels), reduction="none")
        ce = _masked_mean(per_voxel.unsqueeze(1), mask)
    if logits.shape[1] < 2:
        return ce
    dice = soft_dice_per_class(logits, target, batch_dice, ignore_label=ignore_label).mean()
    return ce + (1.0 - dice)


def region_masks(target: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[B, R, *S]`` float: for each region, 1 where the integer label is one of the region's values.

    >>> region_masks(torch.tensor([[[0, 1, 2, 3]]]), [(1, 2, 3), (2, 3), (3,)])[0].int().tolist()
    [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    """
    labels = target[:, 0].long()
    return torch.stack([torch.isin(labels, torch.as_tensor(list(values), device=labels.device))
                        for values in regions], dim=1).float()


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, regions: Sequence[Sequence[int]], batch_dice: bool,
                  ignore_label: int | None = None) -> torch.Tensor:
    """Region training: ``BCE + (1 - mean soft Dice)`` over one sigmoid output per region.

    logits ``[B, R, *S]`` (R regions, no background channel, so every region enters the Dice), target
    ``[B, 1, *S]`` integer labels, turned into region masks here; voxels labelled ``ignore_label`` get no loss.
    """
    truth = region_masks(target, regions)
    mask = annotated_mask(target, ignore_label)
    bce = F.binary_cross_entropy_with_logits(logits.float(), truth, reduction="none")
    dice = soft_dice(torch.sigmoid(logits.float()), truth, batch_dice, mask).mean()
    return _masked_mean(bce, mask) + (1.0 - dice)


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """``1/2^i`` for output i (highest resolution first), the lowest-resolution output 0, normalised to 1.

    >>> deep_supervision_weights(3)  # [1, 0.5, 0] / 1.5
    [0.6666666666666666, 0.3333333333333333, 0.0]
    """
    weights = [1.0 / 2**i for i in range(num_outputs)]
    if num_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


# ------------------------------------------------------------------------------------------- registry
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(logits [B, K, *S], target [B, 1, *S]) -> scalar`` for one network output."""


@dataclass(frozen=True)
class LossContext:
    """What a loss may depend on, all known from the plan before training starts.

    ``num_outputs``: the network's output channels; ``batch_dice``: sum Dice over the batch too (the
    reference does for 2D configurations); ``ignore_label``: the label value that gets no loss (None: every
    voxel is annotated); ``regions``: per network output, the label values it covers (region datasets; None:
    one output per class)."""

    dims: int
    num_outputs: int
    batch_dice: bool
    ignore_label: int | None = None
    regions: tuple[tuple[int, ...], ...] | None = None


LossFactory = Callable[[LossContext], LossFn]


@dataclass(frozen=True)
class _LossEntry:
    factory: LossFactory
    description: str


_LOSSES: dict[str, _LossEntry] = {}
DEFAULT_LOSS = "dice_ce"


def register_loss(name: str, description: str) -> Callable[[LossFactory], LossFactory]:
    """Decorator registering ``factory(context) -> LossFn`` under ``name`` (``autoseg train --loss NAME``)."""

    def decorator(factory: LossFactory) -> LossFactory:
        if name in _LOSSES and _LOSSES[name].factory is not factory:
            raise ValueError(f"loss {name!r} is registered twice")
        _LOSSES[name] = _LossEntry(factory, description)
        return factory

    return decorator


def available_losses() -> dict[str, str]:
    """Registered loss names -> one-line descriptions (for --help)."""
    return {name: entry.description for name, entry in sorted(_LOSSES.items())}


def require_loss(name: str) -> str:
    """``name`` when it is registered; else a ConfigurationError listing the choices (checked before a run
    touches its folder)."""
    if name not in _LOSSES:
        raise ConfigurationError(f"--loss {name!r}: unknown loss; choose one of {', '.join(sorted(_LOSSES))}")
    return name


def build_loss(name: str, context: LossContext) -> LossFn:
    """The loss registered as ``name`` for ``context``; unknown names raise ConfigurationError with the choices."""
    return _LOSSES[require_loss(name)].factory(context)


def default_loss(context: LossContext) -> str:
    """The reference's loss for the dataset kind: sigmoid regions train with dice_bce, classes with dice_ce."""
    return "dice_bce" if context.regions else DEFAULT_LOSS


@register_loss("dice_ce", "soft Dice over the foreground classes + cross-entropy, weighted 1:1 (the nnU-Net loss)")
def _dice_ce(context: LossContext) -> LossFn:
    if context.regions:
        raise ConfigurationError("--loss dice_ce: a region dataset has one sigmoid output per region, not a softmax "
                                 "over classes; train it with --loss dice_bce (its default)")
    return functools.partial(dice_ce_loss, batch_dice=context.batch_dice, ignore_label=context.ignore_label)


@register_loss("dice_bce", "soft Dice + binary cross-entropy over one sigmoid output per region (region datasets)")
def _dice_bce(context: LossContext) -> LossFn:
    if not context.regions:
        raise ConfigurationError("--loss dice_bce: needs a region dataset (labels with lists of values and "
                                 "regions_class_order in dataset.json); train classes with --loss dice_ce")
    return functools.partial(dice_bce_loss, regions=context.regions, batch_dice=context.batch_dice,
                             ignore_label=context.ignore_label)


def deep_supervision_loss(
    outputs: Sequence[torch.Tensor] | torch.Tensor,
    targets: Sequence[torch.Tensor] | torch.Tensor,
    loss: LossFn,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Weighted sum of ``loss`` over the outputs (highest resolution first).

    ``outputs[i]`` ``[B, K, *S_i]`` is compared with ``targets[i]`` ``[B, 1, *S_i]``. ``weights`` default to
    :func:`deep_supervision_weights`; outputs with weight 0 are skipped (no wasted compute).
    """
    if isinstance(outputs, torch.Tensor):
        outputs = [outputs]
    if isinstance(targets, torch.Tensor):
        targets = [targets]
    if weights is None:
        weights = deep_supervision_weights(len(outputs))
    if len(targets) < len(outputs):
        raise ValueError(f"{len(outputs)} network outputs but only {len(targets)} targets")
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for output, target, weight in zip(outputs, targets, weights):
        if weight:
            total = total + weight * loss(output, target)
    return total
