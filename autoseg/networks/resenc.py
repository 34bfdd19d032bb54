"""Residual-encoder U-Net ("ResEnc") of nnU-Net 2.x, 2D and 3D from one definition.

Specification: the paper (Isensee et al., "nnU-Net Revisited", MICCAI 2024) and nnU-Net 2.x's published
defaults. Same topology as the plain U-Net (strides, kernels and features from
the planner), with a deeper encoder and a lighter decoder:

- stem: one conv block (conv with bias -> InstanceNorm -> LeakyReLU) from the input to ``features[0]``;
- encoder stage s: ``blocks_per_stage[s]`` residual basic blocks (:class:`ResidualBlock`), by default
  (1, 3, 4, 6, 6, 6, ...) truncated to the number of stages; the first block of a stage carries its stride;
- decoder stage: transposed conv (kernel = stride) -> concatenate [upsampled, skip] -> ONE conv block;
- a 1x1 head after every decoder stage, deep supervision and its weights exactly as :mod:`unet`.

The parameter count equals nnU-Net's ResidualEncoderUNet at the same plan (benchmarks/resenc_parameters.py,
docs/architectures.md).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from autoseg.networks.blocks import (
    ConvNormAct,
    ResidualBlock,
    conv_class,
    init_kaiming,
    nnunet_deep_supervision,
    strided_unet_constraints,
    transposed_conv_class,
)
from autoseg.networks.registry import divisible_by_strides, register

# nnunet.md: residual blocks per encoder stage; stages beyond the list repeat its last entry
DEFAULT_BLOCKS_PER_STAGE = (1, 3, 4, 6)
# instance norm refuses a map of one voxel (one value per channel and sample), in training and at inference
MIN_BOTTLENECK_VOXELS = 2


def default_blocks_per_stage(num_stages: int) -> list[int]:
    """(1, 3, 4, 6, 6, 6, ...) truncated or extended to ``num_stages``."""
    return [DEFAULT_BLOCKS_PER_STAGE[min(s, len(DEFAULT_BLOCKS_PER_STAGE) - 1)] for s in range(num_stages)]


class ResidualEncoderUNet(nn.Module):
    """nnU-Net's residual-encoder U-Net; a :class:`~autoseg.networks.protocol.SegmentationNetwork`.

    ``blocks_per_stage``: residual blocks per encoder stage (None: :func:`default_blocks_per_stage`);
    ``norm``: "instance" (nnU-Net), "batch" or "none"; ``activation``: "leaky_relu" (nnU-Net) or "relu".
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
        blocks_per_stage: Sequence[int] | None = None,
        norm: str = "instance",
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        dims = len(patch_size)
        n_stages = len(features)
        if n_stages < 2:
            raise ValueError("a U-Net needs at least 2 stages (one downsampling)")
        blocks = list(blocks_per_stage) if blocks_per_stage is not None else default_blocks_per_stage(n_stages)
        if len(blocks) != n_stages or any(int(b) < 1 for b in blocks):
            raise ValueError(
                f"blocks_per_stage {blocks} needs one entry >= 1 per stage ({n_stages} stages)"
            )
        self.dims = dims
        self.patch_size = tuple(patch_size)
        self.deep_supervision = deep_supervision
        self.blocks_per_stage = [int(b) for b in blocks]
        block = dict(norm=norm, activation=activation)

        # the stem lifts the input to features[0] so that stage 0's residual blocks have an identity skip
        self.stem = ConvNormAct(dims, in_channels, features[0], kernel_sizes[0], 1, **block)
        self.encoder = nn.ModuleList()
        channels = features[0]
        for s in range(n_stages):
            stage = [ResidualBlock(dims, channels, features[s], kernel_sizes[s], strides[s], **block)]
            stage += [
                ResidualBlock(dims, features[s], features[s], kernel_sizes[s], 1, **block)
                for _ in range(self.blocks_per_stage[s] - 1)
            ]
            self.encoder.append(nn.Sequential(*stage))
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
                ConvNormAct(dims, 2 * features[s - 1], features[s - 1], kernel_sizes[s - 1], 1, **block)
            )
            # a head on every decoder stage even without deep supervision, as unet (checkpoints load either way)
            self.heads.append(conv_class(dims)(features[s - 1], num_classes, 1, bias=True))

        # protocol members (blocks.nnunet_deep_supervision)
        self.ds_scales, self.ds_weights = nnunet_deep_supervision(strides, deep_supervision)

        # Kaiming on every conv; ResidualBlock has already zeroed its last norm, which this leaves alone
        self.apply(init_kaiming)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> Any:
        skips: list[torch.Tensor] = []
        h = self.stem(x)
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
            # the same maps as unet (architectures.md 5.6): encoder stages 1..n-1, decoder stages but the last,
            # and the map fed to the full-resolution head
            return result, {"encoder": skips[1:], "decoder": decoder_maps[:-1], "final": decoder_maps[-1]}
        return result


def resenc_constraints(
    patch_size: Sequence[int], dims: int, strides: Sequence[Sequence[int]] | None = None, **_: Any
) -> list[str]:
    """As the plain U-Net: each patch axis divisible by the product of its strides, and a bottleneck of at least
    ``MIN_BOTTLENECK_VOXELS`` voxels (instance norm needs more than one value per channel)."""
    return strided_unet_constraints(patch_size, strides, MIN_BOTTLENECK_VOXELS)


@register(
    "resenc",
    dims=(2, 3),
    description="Residual-encoder U-Net of nnU-Net 2.x: (1, 3, 4, 6, 6, ...) residual blocks per encoder stage, "
    "one conv per decoder stage; the plain U-Net's topology, InstanceNorm + LeakyReLU.",
    constraints=resenc_constraints,
    divisor=divisible_by_strides,
    supports_selfreg=True,
    citation="Isensee et al., nnU-Net Revisited, MICCAI 2024 (arXiv:2404.09556)",
)
def build_resenc(
    in_channels: int,
    num_classes: int,
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    features: Sequence[int],
    deep_supervision: bool = True,
    blocks_per_stage: Sequence[int] | None = None,
    norm: str = "instance",
    activation: str = "leaky_relu",
) -> ResidualEncoderUNet:
    return ResidualEncoderUNet(
        in_channels, num_classes, patch_size, strides, kernel_sizes, features, deep_supervision,
        blocks_per_stage=blocks_per_stage, norm=norm, activation=activation,
    )
