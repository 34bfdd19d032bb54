"""UNet++: nested dense skip pathways, deep supervision over the top row, pruned inference. 2D and 3D.

Specification: the paper (Zhou et al., DLMIA 2018 / IEEE TMI 2019).
Node ``X[i][j]`` (level ``i``, position ``j`` along the skip pathway) exists for ``i + j <= L``:

- ``X[i][0]`` = H(down(X[i-1][0])): the backbone encoder (strided conv as in the authors' nnU-Net port; the
  original 2D code max-pools, option ``downsample="maxpool"``).
- ``X[i][j]`` = H(concat[up(X[i+1][j-1]), X[i][0], ..., X[i][j-1]]), input ``(j + 1) * f_i`` channels
  (4.7: not ``2 f_i``), ``up`` a transposed conv with kernel = stride = the level's stride (so anisotropic
  plans work).
- Heads: 1x1 conv on every top-row node ``X[0][1..L]``, all full resolution (4.2; heads on lower nodes are a
  known mistake).

Written for any depth ``L`` (the authors' port is hard-wired to 5 pooling levels, issues #65/#82).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from autoseg.networks.blocks import ConvNormAct, conv_class, init_kaiming, transposed_conv_class
from autoseg.networks.registry import divisible_by_strides, register
from autoseg.networks.unet import unet_constraints


class UNetPlusPlus(nn.Module):
    """UNet++ with ``L = len(features) - 1`` levels. A :class:`~autoseg.networks.protocol.SegmentationNetwork`.

    ``prune_depth`` (1..L, default L): compute only the sub-network ``UNet++ L_d`` (nodes ``i + j <= d``)
    and predict from ``X[0][d]`` (4.2: pruning means not computing the deeper nodes, not zeroing weights).
    Change it after training with :meth:`prune`. ``inference_mode``: ``"fast"`` uses the head of
    ``X[0][d]``; ``"accurate"`` averages the probabilities of heads ``1..d`` and returns their log, which
    are valid logits (softmax gives back the averaged probabilities). Deep-supervision outputs are returned
    deepest head first (``X[0][L]``, the main prediction, then ``X[0][L-1]`` ...), all at full resolution.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        patch_size: Sequence[int],
        strides: Sequence[Sequence[int]],
        kernel_sizes: Sequence[Sequence[int]],
        features: Sequence[int],
        deep_supervision: bool = True,
        norm: str = "instance",
        activation: str = "leaky_relu",
        dropout: float = 0.0,
        downsample: str = "conv",
        prune_depth: int | None = None,
        inference_mode: str = "fast",
    ) -> None:
        super().__init__()
        dims = len(patch_size)
        depth = len(features) - 1
        if depth < 1:
            raise ValueError("UNet++ needs at least 2 levels")
        if downsample not in ("conv", "maxpool"):
            raise ValueError(f"downsample must be 'conv' or 'maxpool', got {downsample!r}")
        if inference_mode not in ("fast", "accurate"):
            raise ValueError(f"inference_mode must be 'fast' or 'accurate', got {inference_mode!r}")
        self.dims = dims
        self.depth = depth
        self.patch_size = tuple(patch_size)
        self.deep_supervision = deep_supervision
        self.inference_mode = inference_mode
        block = dict(norm=norm, activation=activation, dropout=dropout)

        def node(in_ch: int, level: int, stride: Sequence[int] | int = 1) -> nn.Sequential:
            return nn.Sequential(
                ConvNormAct(dims, in_ch, features[level], kernel_sizes[level], stride, **block),
                ConvNormAct(dims, features[level], features[level], kernel_sizes[level], 1, **block),
            )

        # nodes and upsamplers are stored under "i_j" keys so the state dict reads like the paper's X^{i,j}
        self.nodes = nn.ModuleDict()
        self.up = nn.ModuleDict()
        self.pool = nn.ModuleDict()
        for i in range(depth + 1):
            if i == 0:
                self.nodes["0_0"] = node(in_channels, 0)
            elif downsample == "conv":
                self.nodes[f"{i}_0"] = node(features[i - 1], i, strides[i])
            else:
                pool = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims]
                self.pool[str(i)] = pool(kernel_size=tuple(strides[i]), stride=tuple(strides[i]))
                self.nodes[f"{i}_0"] = node(features[i - 1], i)
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                self.up[f"{i}_{j}"] = transposed_conv_class(dims)(
                    features[i + 1], features[i], strides[i + 1], stride=strides[i + 1], bias=True
                )
                self.nodes[f"{i}_{j}"] = node((j + 1) * features[i], i)

        # one head per top-row node with deep supervision; without it only the deepest (4.3: "one head")
        head_positions = range(1, depth + 1) if deep_supervision else [depth]
        self.heads = nn.ModuleDict(
            {str(j): conv_class(dims)(features[0], num_classes, 1, bias=True) for j in head_positions}
        )
        self.prune_depth = depth
        if prune_depth is not None:
            self.prune(prune_depth)
        # protocol members: all outputs are full resolution; the paper sums per-head losses with equal weights
        # (4.2). They describe the training outputs: pruned or "accurate" inference returns fewer.
        n_out = depth if deep_supervision else 1
        self.ds_scales: list[tuple[float, ...]] = [(1.0,) * dims for _ in range(n_out)]
        self.ds_weights: list[float] = [1.0 / n_out] * n_out
        self.apply(init_kaiming)

    def prune(self, depth: int) -> None:
        """Predict from ``X[0][depth]``, computing only the nodes ``i + j <= depth`` (pruned inference)."""
        if not 1 <= depth <= self.depth:
            raise ValueError(f"prune depth must be in 1..{self.depth}, got {depth}")
        if str(depth) not in self.heads:
            raise ValueError(
                f"no head on X[0][{depth}]: pruning needs a network trained with deep_supervision=True"
            )
        self.prune_depth = depth

    def forward(self, x: torch.Tensor, return_features: bool = False) -> Any:
        d = self.prune_depth
        grid: dict[tuple[int, int], torch.Tensor] = {}
        for i in range(d + 1):
            h = x if i == 0 else grid[(i - 1, 0)]
            if str(i) in self.pool:
                h = self.pool[str(i)](h)
            grid[(i, 0)] = self.nodes[f"{i}_0"](h)
        # compute column by column: X[i][j] needs X[i+1][j-1] and the row's earlier nodes
        for j in range(1, d + 1):
            for i in range(d + 1 - j):
                inputs = [self.up[f"{i}_{j}"](grid[(i + 1, j - 1)])] + [grid[(i, k)] for k in range(j)]
                grid[(i, j)] = self.nodes[f"{i}_{j}"](torch.cat(inputs, dim=1))

        top_row = [j for j in range(d, 0, -1) if str(j) in self.heads]  # deepest first
        if self.deep_supervision and self.training:
            result: Any = [self.heads[str(j)](grid[(0, j)]) for j in top_row]
        elif self.deep_supervision and self.inference_mode == "accurate":
            probabilities = torch.stack(
                [torch.softmax(self.heads[str(j)](grid[(0, j)]).float(), dim=1) for j in top_row]
            ).mean(0)
            result = [torch.log(probabilities.clamp_min(1e-12))]
        elif self.deep_supervision:
            result = [self.heads[str(j)](grid[(0, j)]) for j in top_row]
        else:
            result = self.heads[str(d)](grid[(0, d)])

        if return_features:
            features = {
                "encoder": [grid[(i, 0)] for i in range(1, d + 1)],
                "decoder": [grid[(i, j)] for j in range(1, d + 1) for i in range(d + 1 - j) if (i, j) != (0, d)],
                "final": grid[(0, d)],
            }
            return result, features
        return result


@register(
    "unetpp",
    dims=(2, 3),
    description="UNet++: nested dense skip pathways between encoder and decoder, deep supervision on the "
    "full-resolution top-row nodes, pruned inference at a chosen depth (option prune_depth).",
    constraints=unet_constraints,
    divisor=divisible_by_strides,
    supports_selfreg=True,
    citation="Zhou et al., UNet++, DLMIA 2018 and IEEE TMI 2019",
)
def build_unetpp(
    in_channels: int,
    num_classes: int,
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    features: Sequence[int],
    deep_supervision: bool = True,
    norm: str = "instance",
    activation: str = "leaky_relu",
    dropout: float = 0.0,
    downsample: str = "conv",
    prune_depth: int | None = None,
    inference_mode: str = "fast",
) -> UNetPlusPlus:
    return UNetPlusPlus(
        in_channels, num_classes, patch_size, strides, kernel_sizes, features, deep_supervision,
        norm=norm, activation=activation, dropout=dropout, downsample=downsample,
        prune_depth=prune_depth, inference_mode=inference_mode,
    )
