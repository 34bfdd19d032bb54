"""Small building blocks shared by the architectures.

Everything here works for 2D and 3D alike: the dimensionality is a constructor argument (``dims``), never a
separate class, so one network definition serves both (the MONAI ``spatial_dims`` idea, see style.md).
Tensors are channels-first: ``[B, C, (Z,) Y, X]``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def conv_class(dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d`` for a 2D or 3D network."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[_check_dims(dims)]


def transposed_conv_class(dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[_check_dims(dims)]


def dropout_class(dims: int) -> type[nn.Module]:
    """Channel dropout (``nn.Dropout2d``/``nn.Dropout3d``): drops whole feature maps, as the papers do."""
    return {2: nn.Dropout2d, 3: nn.Dropout3d}[_check_dims(dims)]


def _check_dims(dims: int) -> int:
    if dims not in (2, 3):
        raise ValueError(f"networks are 2D or 3D, got dims={dims}")
    return dims


def as_tuple(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    """``3 -> (3, 3, 3)``; a sequence is checked to have ``dims`` entries."""
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    if len(value) != dims:
        raise ValueError(f"expected {dims} values (one per axis), got {value}")
    return value


def same_padding(kernel_size: Sequence[int]) -> tuple[int, ...]:
    """Padding that keeps the size for odd kernels ("same"), as nnU-Net uses for every conv."""
    return tuple((k - 1) // 2 for k in kernel_size)


def norm_layer(kind: str | None, dims: int, channels: int) -> nn.Module:
    """A normalisation layer by name.

    ``"instance"``: InstanceNorm, eps 1e-5, affine (nnU-Net's choice); ``"instance_noaffine"``: InstanceNorm
    without affine parameters (MONAI's default, used by UNETR++'s full-resolution path); ``"batch"``:
    BatchNorm; ``"none"``/``None``: identity (the original UNet++ has no normalisation).
    """
    if kind in (None, "none"):
        return nn.Identity()
    if kind == "instance":
        return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims](channels, eps=1e-5, affine=True)
    if kind == "instance_noaffine":
        return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims](channels, eps=1e-5, affine=False)
    if kind == "batch":
        return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](channels, eps=1e-5)
    raise ValueError(f"unknown norm {kind!r}; expected 'instance', 'instance_noaffine', 'batch' or 'none'")


def activation_layer(kind: str, negative_slope: float = 0.01) -> nn.Module:
    """``"leaky_relu"`` (slope 0.01, nnU-Net), ``"relu"`` (original UNet++) or ``"gelu"``."""
    if kind == "leaky_relu":
        return nn.LeakyReLU(negative_slope, inplace=True)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {kind!r}; expected 'leaky_relu', 'relu' or 'gelu'")


class ConvNormAct(nn.Sequential):
    """conv (bias) -> norm -> activation [-> channel dropout]: nnU-Net's conv block (architectures.md 1).

    The conv keeps its bias even before a norm, as nnU-Net does, so our parameter counts match its networks.
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int] | int = 1,
        norm: str | None = "instance",
        activation: str = "leaky_relu",
        dropout: float = 0.0,
    ) -> None:
        kernel_size = as_tuple(kernel_size, dims)
        layers: list[nn.Module] = [
            conv_class(dims)(
                in_channels,
                out_channels,
                kernel_size,
                stride=as_tuple(stride, dims),
                padding=same_padding(kernel_size),
                bias=True,
            ),
            norm_layer(norm, dims, out_channels),
            activation_layer(activation),
        ]
        if dropout > 0:
            layers.append(dropout_class(dims)(dropout))
        super().__init__(*layers)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a channels-first map (one normalisation per pixel/voxel).

    The transformer-style blocks (UNet-2022) normalise each position over its channels; this applies
    ``F.layer_norm`` with the channel axis moved last and back, so callers stay channels-first.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)
        x = F.layer_norm(x, (self.channels,), self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample during training (rate ``p``)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.empty(mask_shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep


def init_kaiming(module: nn.Module, negative_slope: float = 1e-2) -> None:
    """Kaiming-normal (slope 1e-2) on conv weights, zero biases: nnU-Net's initialisation (architectures.md 1)."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=negative_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def prod_per_axis(strides: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Total downsampling per axis: the product of the strides of all stages."""
    return tuple(math.prod(axis) for axis in zip(*strides))


def cumulative_strides(strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Downsampling factor per axis at each stage (``cumprod`` over stages)."""
    out: list[tuple[int, ...]] = []
    current = [1] * len(strides[0])
    for stride in strides:
        current = [c * s for c, s in zip(current, stride)]
        out.append(tuple(current))
    return out


def nnunet_deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net v2's loss weights of ``num_outputs`` outputs (highest resolution first): ``1/2^i``, the lowest
    resolution output gets 0 (when there are several), normalised to sum 1; [2/3, 1/3, 0] for three."""
    weights = [1.0 / 2**i for i in range(num_outputs)]
    if len(weights) > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def nnunet_deep_supervision(strides: Sequence[Sequence[int]], deep_supervision: bool
                            ) -> tuple[list[tuple[float, ...]], list[float]]:
    """The SegmentationNetwork protocol's ``(ds_scales, ds_weights)`` of a U-Net whose decoder stages
    0 .. n-2 each have a head: at ``1/cumprod(strides)``, highest resolution first, nnU-Net's weights; without
    deep supervision the one full-resolution output, weight 1."""
    dims = len(strides[0])
    if not deep_supervision:
        return [(1.0,) * dims], [1.0]
    scales = cumulative_strides(strides)[: len(strides) - 1]
    return [tuple(1.0 / f for f in factor) for factor in scales], nnunet_deep_supervision_weights(len(strides) - 1)


def avg_pool_class(dims: int) -> type[nn.Module]:
    """``nn.AvgPool2d`` or ``nn.AvgPool3d``."""
    return {2: nn.AvgPool2d, 3: nn.AvgPool3d}[_check_dims(dims)]


class ResidualBlock(nn.Module):
    """Residual basic block: conv -> norm -> act -> conv -> norm, plus the skip, then act (He et al. 2016).

    The first conv carries the block's ``stride``. The skip is the identity when shape and channels match;
    otherwise it average-pools with kernel = stride (the "ResNet-D" skip: a strided 1x1 conv would read only
    one voxel in ``prod(stride)`` and discard the rest) and projects with a 1x1 conv (no bias: a norm follows)
    + norm where the channel count changes. This is the block of nnU-Net's residual-encoder U-Net
    (nnunet.md, "residual-encoder presets"); the convs keep their bias like :class:`ConvNormAct`, so
    parameter counts match.

    ``zero_init_last_norm``: start the last norm's affine at zero, so every block begins as its skip and a deep
    encoder trains like a shallow one at first (Goyal et al. 2017, "zero-gamma"; nnU-Net's ResEnc does the
    same).
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int] | int = 1,
        norm: str | None = "instance",
        activation: str = "leaky_relu",
        zero_init_last_norm: bool = True,
    ) -> None:
        super().__init__()
        kernel_size = as_tuple(kernel_size, dims)
        stride = as_tuple(stride, dims)
        conv = conv_class(dims)
        self.conv1 = ConvNormAct(dims, in_channels, out_channels, kernel_size, stride, norm=norm,
                                 activation=activation)
        self.conv2 = conv(out_channels, out_channels, kernel_size, padding=same_padding(kernel_size), bias=True)
        self.norm2 = norm_layer(norm, dims, out_channels)
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride):
            skip.append(avg_pool_class(dims)(stride, stride=stride))
        if in_channels != out_channels:
            skip.append(conv(in_channels, out_channels, 1, bias=False))
            skip.append(norm_layer(norm, dims, out_channels))
        self.skip = nn.Sequential(*skip)  # an empty Sequential is the identity
        self.activation = activation_layer(activation)
        if zero_init_last_norm and getattr(self.norm2, "weight", None) is not None:
            nn.init.zeros_(self.norm2.weight)
            nn.init.zeros_(self.norm2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm2(self.conv2(self.conv1(x))) + self.skip(x))


def strided_unet_constraints(
    patch_size: Sequence[int], strides: Sequence[Sequence[int]] | None, min_bottleneck_voxels: int
) -> list[str]:
    """Problems of ``patch_size`` for a U-Net that downsamples by ``strides``: each axis must be divisible by
    the product of its strides, and the bottleneck must hold at least ``min_bottleneck_voxels`` voxels (instance
    norm needs more than one value per channel). Empty list = accepted; no strides = nothing to check."""
    if strides is None:
        return []
    divisor = prod_per_axis(strides)
    bad = [
        f"axis {axis} size {p} is not divisible by {d}"
        for axis, (p, d) in enumerate(zip(patch_size, divisor))
        if p % d
    ]
    if bad:
        return [f"{', '.join(bad)} (product of the strides per axis is {divisor})"]
    bottleneck = tuple(p // d for p, d in zip(patch_size, divisor))
    if math.prod(bottleneck) < min_bottleneck_voxels:
        return [f"the bottleneck {bottleneck} holds fewer than {min_bottleneck_voxels} voxels (normalisation "
                "needs more than one value per channel); use fewer downsamplings or a larger patch"]
    return []
