"""SelfReg-UNet regularisation losses: semantic consistency (SCR) and internal feature distillation (IFD).

Specification: the paper (Zhu et al., SelfReg-UNet, MICCAI 2024). No new
parameters; works on any registered network with ``supports_selfreg`` (``forward(x, return_features=True)``
gives ``{"encoder": [...], "decoder": [...], "final": tensor}``), 2D or 3D alike.

Use in a training step::

    outputs, features = network(x, return_features=True)
    loss = segmentation_loss(outputs, target) + selfreg_loss(features, generator=generator)
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch.nn import functional as F

# 5.2: the paper's ablation picks lambda_IFD = lambda_SCR = 0.015 (author reply, issue #3)
DEFAULT_LAMBDA_IFD = 0.015
DEFAULT_LAMBDA_SCR = 0.015


def _pool_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[x.ndim - 2]
    return pool(x, tuple(size))


def semantic_consistency_loss(
    student: torch.Tensor, teacher: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """SCR (5.1): MSE between ``student`` channels and randomly paired channels of the detached ``teacher``.

    ``student``: ``[B, Cs, *spatial_s]``; ``teacher``: ``[B, Ct, *spatial_t]`` (the final decoder map). Both
    are average-pooled to their per-axis minimum size (so a 3D student is matched on its exact shape, not a
    square, 5.5); ``m = min(Cs, Ct)`` channels are drawn from each without replacement and paired by
    position; the draw is redone at every call from ``generator`` (seed it for reproducible runs). The
    teacher is detached so the final layer is not pulled toward shallow features (5.5).
    """
    if student.shape[0] != teacher.shape[0] or student.ndim != teacher.ndim:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} do not pair up")
    size = [min(s, t) for s, t in zip(student.shape[2:], teacher.shape[2:])]
    student = _pool_to(student.float(), size)
    teacher = _pool_to(teacher.detach().float(), size)
    m = min(student.shape[1], teacher.shape[1])
    student_channels = torch.randperm(student.shape[1], generator=generator)[:m].to(student.device)
    teacher_channels = torch.randperm(teacher.shape[1], generator=generator)[:m].to(teacher.device)
    return F.mse_loss(student[:, student_channels], teacher[:, teacher_channels])


def internal_distillation_loss(feature: torch.Tensor) -> torch.Tensor:
    """IFD (5.1): channels of one map ranked by their mean L2-normalised response; the high-score half is
    pulled toward the low-score half (MSE, both halves get gradients) to reduce redundancy.

    ``feature``: ``[B, C, *spatial]``. The k-th channel of the upper half pairs with the k-th of the lower
    half; with an odd ``C`` the lowest-ranked channel is left out (the original breaks on odd counts, 5.1).
    """
    if feature.shape[1] < 2:
        return feature.new_zeros(()).float()
    feature = feature.float()
    normalised = F.normalize(feature.flatten(2), dim=2)  # over spatial positions, per sample and channel
    score = normalised.mean(dim=(0, 2)).detach()  # per channel, mean over batch and space
    order = torch.argsort(score, descending=True)
    half = feature.shape[1] // 2
    return F.mse_loss(feature[:, order[:half]], feature[:, order[half: 2 * half]])


def selfreg_loss(
    features: Mapping[str, object],
    lambda_ifd: float = DEFAULT_LAMBDA_IFD,
    lambda_scr: float = DEFAULT_LAMBDA_SCR,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The SelfReg term added to the segmentation loss (5.2, the paper's split form):

    ``lambda_ifd * [mean_k IFD(encoder_k) + mean_k IFD(decoder_k)]
    + lambda_scr * mean over all encoder and decoder maps of SCR(map, final)``.

    ``features``: ``{"encoder": [tensors], "decoder": [tensors], "final": tensor}`` as returned by
    ``network(x, return_features=True)``. Returns a float32 scalar.
    """
    encoder = list(features.get("encoder", []))  # type: ignore[arg-type]
    decoder = list(features.get("decoder", []))  # type: ignore[arg-type]
    final = features["final"]
    assert isinstance(final, torch.Tensor)
    total = final.new_zeros((), dtype=torch.float32)
    for group in (encoder, decoder):
        if group:
            total = total + lambda_ifd * torch.stack([internal_distillation_loss(f) for f in group]).mean()
    students = encoder + decoder
    if students:
        total = total + lambda_scr * torch.stack(
            [semantic_consistency_loss(s, final, generator) for s in students]
        ).mean()
    return total
