"""Losses: soft Dice + cross-entropy, and the deep-supervision weighting.

Numbers from the nnU-Net method (Isensee et al., Nature Methods 2021): Dice over foreground
classes only (background excluded), smooth 1e-5, batch Dice for 2D configurations (the sums run over the
batch as well as space), Dice and CE weighted 1 each; deep-supervision weights 1/2^i, lowest resolution
excluded, normalised to sum 1.

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


def soft_dice_per_class(
    logits: torch.Tensor, target: torch.Tensor, batch_dice: bool, smooth: float = DICE_SMOOTH
) -> torch.Tensor:
    """Soft Dice of each foreground class.

    logits: ``[B, K, *spatial]`` (K classes incl. background); target: ``[B, 1, *spatial]`` integer labels.
    Returns ``[K-1]`` when ``batch_dice`` else ``[B, K-1]``: ``(2 * sum p*g + smooth) / (sum p + sum g + smooth)``
    with p the softmax probability and g the one-hot target.
    """
    probabilities = torch.softmax(logits.float(), dim=1)[:, 1:]
    num_classes = logits.shape[1]
    labels = target[:, 0].long()
    one_hot = torch.stack([(labels == k) for k in range(1, num_classes)], dim=1).to(probabilities.dtype)
    axes = tuple(range(2, logits.ndim))
    if batch_dice:
        axes = (0, *axes)
    intersection = (probabilities * one_hot).sum(axes)
    denominator = probabilities.sum(axes) + one_hot.sum(axes)
    return (2.0 * intersection + smooth) / torch.clamp(denominator + smooth, min=1e-8)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool) -> torch.Tensor:
    """``CE + (1 - mean foreground soft Dice)``; logits ``[B, K, *S]``, target ``[B, 1, *S]`` -> scalar."""
    ce = F.cross_entropy(logits.float(), target[:, 0].long())
    if logits.shape[1] < 2:
        return ce
    dice = soft_dice_per_class(logits, target, batch_dice).mean()
    return ce + (1.0 - dice)


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
    reference does for 2D configurations)."""

    dims: int
    num_outputs: int
    batch_dice: bool


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


@register_loss("dice_ce", "soft Dice over the foreground classes + cross-entropy, weighted 1:1 (the nnU-Net loss)")
def _dice_ce(context: LossContext) -> LossFn:
    return functools.partial(dice_ce_loss, batch_dice=context.batch_dice)


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
