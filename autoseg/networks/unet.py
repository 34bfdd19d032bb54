"""Plain convolutional U-Net of the nnU-Net method ("PlainConvUNet"), 2D and 3D from one definition.

Specification: the paper (Isensee et al., Nature Methods 2021).
Encoder stage s = two conv blocks (conv with bias -> InstanceNorm(eps 1e-5, affine) -> LeakyReLU(0.01)), the
first with stride ``strides[s]`` (strided-conv downsampling, no pooling). Decoder stage = transposed conv
(kernel = stride) -> concatenate [upsampled, skip] -> two conv blocks. A 1x1 head after every decoder stage.
Any number of stages; anisotropic strides and kernels come from the planner.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from autoseg.networks.blocks import (
    ConvNormAct,
    conv_class,
    init_kaiming,
    nnunet_deep_supervision,
    strided_unet_constraints,
    transposed_conv_class,
)
from autoseg.networks.registry import divisible_by_strides, register

# instance norm refuses a map of one voxel (one value per channel and sample), in training and at inference
MIN_BOTTLENECK_VOXELS = 2


class PlainConvUNet(nn.Module):
    """nnU-Net's plain U-Net; a :class:`~autoseg.networks.protocol.SegmentationNetwork`.

    ``norm``: "instance" (nnU-Net), "batch" or "none"; ``activation``: "leaky_relu" (nnU-Net) or "relu";
    ``dropout``: channel dropout after each conv block (0 in nnU-Net).
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
    ) -> None:
        super().__init__()
        dims = len(patch_size)
        n_stages = len(features)
        if n_stages < 2:
            raise ValueError("a U-Net needs at least 2 stages (one downsampling)")
        self.dims = dims
        self.patch_size = tuple(patch_size)
        self.deep_supervision = deep_supervision
        block = dict(norm=norm, activation=activation, dropout=dropout)

        self.encoder = nn.ModuleList()
        channels = in_channels
        for s in range(n_stages):
            self.encoder.append(
                nn.Sequential(
                    ConvNormAct(dims, channels, features[s], kernel_sizes[s], strides[s], **block),
                    ConvNormAct(dims, features[s], features[s], kernel_sizes[s], 1, **block),
                )
            )
            channels = features[s]

        # decoder lists run from the bottleneck upwards: index 0 upsamples stage n-1 to stage n-2
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for s in range(n_stages - 1, 0, -1):
            self.upsample.append(
                transposed_conv_class(dims)(
                    features[s], features[s - 1], strides[s], stride=strides[s], bias=True
                )
            )
            self.decoder.append(
                nn.Sequential(
                    ConvNormAct(dims, 2 * features[s - 1], features[s - 1], kernel_sizes[s - 1], 1, **block),
                    ConvNormAct(dims, features[s - 1], features[s - 1], kernel_sizes[s - 1], 1, **block),
                )
            )
            # nnU-Net builds a head on every decoder stage even without deep supervision; we do too so a
            # checkpoint loads either way and parameter counts match the published 31.21 M
            self.heads.append(conv_class(dims)(features[s - 1], num_classes, 1, bias=True))

        # protocol members (blocks.nnunet_deep_supervision)
        self.ds_scales, self.ds_weights = nnunet_deep_supervision(strides, deep_supervision)

        self.apply(init_kaiming)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> Any:
        skips: list[torch.Tensor] = []
        h = x
        for stage in self.encoder:
            h = stage(h)
            skips.append(h)

        decoder_maps: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        last = len(self.decoder) - 1
        for i, (up, stage, head) in enumerate(zip(self.upsample, self.decoder, self.heads)):
            h = stage(torch.cat([up(h), skips[-(i + 2)]], dim=1))
            decoder_maps.append(h)
            if self.deep_supervision or i == last:
                outputs.append(head(h))

        result: Any = outputs[::-1] if self.deep_supervision else outputs[-1]
        if return_features:
            # architectures.md 5.6: encoder = stages 1..n-1 (stage 0 excluded like the SelfReg repo's stem),
            # decoder = all decoder stages but the last, final = the map fed to the last head
            features = {"encoder": skips[1:], "decoder": decoder_maps[:-1], "final": decoder_maps[-1]}
            return result, features
        return result


def unet_constraints(
    patch_size: Sequence[int], dims: int, strides: Sequence[Sequence[int]] | None = None, **_: Any
) -> list[str]:
    """Each patch axis must be divisible by the product of that axis' strides (architectures.md 1), and the
    bottleneck must hold at least ``MIN_BOTTLENECK_VOXELS`` voxels: instance norm (batch norm too) needs
    more than one value per channel, in training and, for instance norm, at inference as well."""
    return strided_unet_constraints(patch_size, strides, MIN_BOTTLENECK_VOXELS)


@register(
    "unet",
    dims=(2, 3),
    description="Plain conv U-Net of nnU-Net (InstanceNorm + LeakyReLU, strided-conv down, transposed-conv up); "
    "the default. Any depth, anisotropic strides and kernels.",
    constraints=unet_constraints,
    divisor=divisible_by_strides,
    supports_selfreg=True,
    citation="Isensee et al., nnU-Net, Nature Methods 2021",
)
def build_unet(
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
) -> PlainConvUNet:
    return PlainConvUNet(
        in_channels, num_classes, patch_size, strides, kernel_sizes, features, deep_supervision,
        norm=norm, activation=activation, dropout=dropout,
    )
