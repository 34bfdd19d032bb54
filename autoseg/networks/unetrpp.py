"""UNETR++: hierarchical encoder/decoder of efficient paired-attention (EPA) blocks. 3D, fixed patch size.

Specification: the paper (Shaker et al., IEEE TMI 2024, arXiv 2212.04497).

Shape: a stem (conv, kernel = stride = ``stem_stride``) to 32 channels, then 4 encoder stages of 3 transformer
blocks at widths 32, 64, 128, 256 with 2x downsampling between them; 3 decoder stages (transposed conv, skip
*addition*, 3 transformer blocks) back to 32 channels; a last transposed conv (kernel = stride = stem) to 16
channels, added to a full-resolution residual conv path, then a residual conv block (no attention).

**Fixed patch size**: positional embeddings (tokens x channels) and the token projections E/F (tokens -> p)
are sized by the token count of each stage, so a built network accepts only its ``patch_size``; sliding
window inference must use that patch (section 3.6, authors' issues #48/#50). Parameters grow linearly with
the patch volume.

Mapping from the planner's topology (our choice, section 6.2): every stem in the paper downsamples the
in-plane axes by at least 4 (tokens at full resolution would make E/F and the positional embeddings huge:
117 M parameters at a 44x56x48 patch), while a coarse through-plane axis may keep stride 1 (ACDC, Lung). So,
with ``T`` the plain U-Net plan's total stride per axis, an axis the plan pools at its first downsampling
stage ("fine" axis) gets a stem of ``max(T // 8, 4)`` and three 2x stages; a coarse axis gets a stem of
``max(T // 8, 1)`` and the remaining halvings (up to 3) in its *last* stages, the way nnU-Net pools a coarse
axis late. For the Synapse patch (64x128x128, T = (16, 32, 32)) this is the paper's stem (2, 4, 4) with 2x2x2
stages. The patch divisor can exceed the plan's (SynthMR: (4, 8, 8) -> (4, 32, 32)); ``adjust_patch`` gives
the nearest accepted patch. Override with ``stem_stride`` / ``stage_strides``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from autoseg.networks.blocks import norm_layer, prod_per_axis
from autoseg.networks.registry import register

WIDTHS = (32, 64, 128, 256)  # 3.1
ENCODER_PROJECTION = (64, 64, 64, 32)  # p per encoder stage (3.1)
DECODER_PROJECTION = 64
HEADS = 4
FULL_RESOLUTION_FEATURES = 16
# The transformer blocks' residual convs use batch norm, which in training refuses a single value per
# channel. A bottleneck of one voxel gives exactly that whenever a process trains on one sample (a batch
# split across GPUs), so the deepest stage must hold at least 2 voxels. The paper's patches all do (its
# smallest bottleneck axis is ACDC's 2 through-plane voxels, section 3.6).
MIN_BOTTLENECK_VOXELS = 2


@dataclass(frozen=True)
class Variant:
    """Per-dataset differences of the official code (3.3 item 6, 3.4, 3.10)."""

    token_projection: str  # "shared" E=F with bias, "separate" E and F, "shared_nobias"
    fusion: str  # "concat" (two C -> C/2 projections) or "sum"
    residual_blocks: int  # conv blocks inside each transformer block
    attention_dropout: float


VARIANTS = {
    "synapse": Variant("shared", "concat", 1, 0.15),
    "acdc": Variant("separate", "concat", 2, 0.1),
    "lung": Variant("separate", "concat", 2, 0.1),
    "brats": Variant("shared_nobias", "sum", 1, 0.1),
}


def map_topology(
    strides: Sequence[Sequence[int]] | None,
    dims: int = 3,
    stem_stride: Sequence[int] | None = None,
    stage_strides: Sequence[Sequence[int]] | None = None,
) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """(stem stride, 3 stage strides) from the planner's plain U-Net strides (see the module docstring)."""
    if stem_stride is not None and stage_strides is None:
        return tuple(int(s) for s in stem_stride), [(2,) * dims] * 3
    if stage_strides is not None:
        stages = [tuple(int(s) for s in st) for st in stage_strides]
        if stem_stride is None:
            total = prod_per_axis(strides) if strides is not None else (16,) * dims
            stem_stride = tuple(max(1, t // math.prod(s[a] for s in stages)) for a, t in enumerate(total))
        return tuple(int(s) for s in stem_stride), stages
    if strides is None:
        return (4,) * dims, [(2,) * dims] * 3
    total = prod_per_axis(strides)
    first = strides[1] if len(strides) > 1 else [1] * dims
    stem: list[int] = []
    stages: list[list[int]] = [[1] * dims for _ in range(3)]
    for axis, t in enumerate(total):
        fine = first[axis] == max(first) and max(first) > 1
        stem.append(max(t // 8, 4 if fine else 1))
        halvings = 3 if fine else min(3, int(round(math.log2(max(1, t // stem[-1])))))
        for k in range(halvings):
            stages[2 - k][axis] = 2
    return tuple(stem), [tuple(st) for st in stages]


def stage_shapes(
    patch_size: Sequence[int], stem: Sequence[int], stages: Sequence[Sequence[int]]
) -> list[tuple[int, ...]]:
    """Feature-map size of the 4 encoder stages."""
    shapes = [tuple(p // s for p, s in zip(patch_size, stem))]
    for stride in stages:
        shapes.append(tuple(p // s for p, s in zip(shapes[-1], stride)))
    return shapes


class ResidualConvBlock(nn.Module):
    """conv3 -> norm -> LeakyReLU -> conv3 -> norm, + input (1x1 conv + norm if channels change) -> LeakyReLU.
    Convs without bias (3.4; MONAI's "UnetResBlock")."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = norm_layer(norm, 3, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = norm_layer(norm, 3, out_channels)
        self.act = nn.LeakyReLU(0.01)
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, bias=False),
                                          norm_layer(norm, 3, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class EfficientPairedAttention(nn.Module):
    """EPA (3.3) on tokens ``B x N x C``: shared Q/K for a spatial branch (keys/values projected N -> p, linear
    in N) and a channel branch (d x d attention per head), fused by concat-projection or sum."""

    def __init__(self, channels: int, tokens: int, projection: int, heads: int, variant: Variant,
                 faithful_sa_order: bool = False) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} heads")
        self.heads = heads
        self.faithful_sa_order = faithful_sa_order
        self.fusion = variant.fusion
        self.qkvv = nn.Linear(channels, 4 * channels, bias=False)
        self.project_keys = nn.Linear(tokens, projection, bias=variant.token_projection != "shared_nobias")
        # Synapse/BraTS share one N -> p map between keys and values; ACDC/Lung learn two
        self.project_values = (
            nn.Linear(tokens, projection) if variant.token_projection == "separate" else self.project_keys
        )
        self.temperature_channel = nn.Parameter(torch.ones(heads, 1, 1))
        self.temperature_spatial = nn.Parameter(torch.ones(heads, 1, 1))
        self.dropout = variant.attention_dropout
        if variant.fusion == "concat":
            self.out_spatial = nn.Linear(channels, channels // 2)
            self.out_channel = nn.Linear(channels, channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        q, k, v_channel, v_spatial = self.qkvv(x).reshape(b, n, 4, h, d).permute(2, 0, 3, 4, 1)  # each B,h,d,N
        # spatial keys are projected *before* normalisation (3.10: the code projects un-normalised K)
        k_projected = self.project_keys(k)  # B,h,d,p
        v_projected = self.project_values(v_spatial)  # B,h,d,p
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        dropout = self.dropout if self.training else 0.0

        # channel branch: d x d attention, softmax over key channels
        attention = torch.softmax((q @ k.transpose(-2, -1)) * self.temperature_channel, dim=-1)
        attention = F.dropout(attention, dropout, self.training)
        x_channel = (attention @ v_channel).permute(0, 3, 1, 2).reshape(b, n, c)

        # spatial branch: N x p attention, softmax over p; the temperature is folded into the queries so the
        # fused kernel can be used (scale 1)
        x_spatial = F.scaled_dot_product_attention(
            q.transpose(-2, -1) * self.temperature_spatial,
            k_projected.transpose(-2, -1),
            v_projected.transpose(-2, -1),
            dropout_p=dropout,
            scale=1.0,
        )  # B,h,N,d
        if self.faithful_sa_order:
            # the published code's axis order (issue #62): scrambles heads/channels/tokens
            x_spatial = x_spatial.permute(0, 3, 1, 2).reshape(b, n, c)
        else:
            x_spatial = x_spatial.permute(0, 2, 1, 3).reshape(b, n, c)

        if self.fusion == "concat":
            return torch.cat([self.out_spatial(x_spatial), self.out_channel(x_channel)], dim=-1)
        return x_spatial + x_channel


class TransformerBlock(nn.Module):
    """3.4: tokens + positional embedding; ``T + gamma * EPA(LN(T))``; then ``V + Conv1x1(Dropout3d(R(V)))``."""

    def __init__(self, channels: int, tokens: int, projection: int, variant: Variant,
                 faithful_sa_order: bool = False) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.zeros(1, tokens, channels))
        self.norm = nn.LayerNorm(channels)
        self.gamma = nn.Parameter(torch.full((channels,), 1e-6))  # layer scale
        self.attention = EfficientPairedAttention(channels, tokens, projection, HEADS, variant, faithful_sa_order)
        self.conv = nn.Sequential(*[ResidualConvBlock(channels, channels, "batch")
                                    for _ in range(variant.residual_blocks)])
        self.out = nn.Sequential(nn.Dropout3d(0.1), nn.Conv3d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        tokens = x.flatten(2).transpose(1, 2) + self.position
        tokens = tokens + self.gamma * self.attention(self.norm(tokens))
        volume = tokens.transpose(1, 2).reshape(b, c, *spatial)
        return volume + self.out(self.conv(volume))


class UNETRPlusPlus(nn.Module):
    """UNETR++ built for exactly one ``patch_size`` (see the module docstring); a
    :class:`~autoseg.networks.protocol.SegmentationNetwork`."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        patch_size: Sequence[int],
        stem_stride: Sequence[int],
        stage_strides: Sequence[Sequence[int]],
        deep_supervision: bool = True,
        variant: str = "synapse",
        faithful_sa_order: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown UNETR++ variant {variant!r}; expected one of {sorted(VARIANTS)}")
        config = VARIANTS[variant]
        self.patch_size = tuple(patch_size)
        self.deep_supervision = deep_supervision
        stem = tuple(stem_stride)
        stages = [tuple(s) for s in stage_strides]
        shapes = stage_shapes(patch_size, stem, stages)
        tokens = [math.prod(s) for s in shapes]
        block = dict(variant=config, faithful_sa_order=faithful_sa_order)

        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, WIDTHS[0], stem, stride=stem, bias=False),
            nn.GroupNorm(math.gcd(in_channels, WIDTHS[0]), WIDTHS[0]),  # 3.2: groups = input channels
        )
        self.downsample = nn.ModuleList([
            nn.Sequential(
                nn.Conv3d(WIDTHS[i], WIDTHS[i + 1], stages[i], stride=stages[i], bias=False),
                nn.GroupNorm(WIDTHS[i], WIDTHS[i + 1]),
            )
            for i in range(3)
        ])
        self.encoder = nn.ModuleList([
            nn.Sequential(*[TransformerBlock(WIDTHS[i], tokens[i], projection_size(ENCODER_PROJECTION[i], tokens[i]), **block)
                            for _ in range(3)])
            for i in range(4)
        ])
        # the official code initialises only the encoder's linear layers (truncated normal 0.02), 3.5
        self.encoder.apply(self._init_linear)

        self.full_resolution = ResidualConvBlock(in_channels, FULL_RESOLUTION_FEATURES, "instance_noaffine")
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in (2, 1, 0):
            self.upsample.append(
                nn.ConvTranspose3d(WIDTHS[i + 1], WIDTHS[i], stages[i], stride=stages[i], bias=False)
            )
            self.decoder.append(nn.Sequential(*[TransformerBlock(WIDTHS[i], tokens[i], projection_size(DECODER_PROJECTION, tokens[i]), **block)
                                                for _ in range(3)]))
        self.upsample_last = nn.ConvTranspose3d(WIDTHS[0], FULL_RESOLUTION_FEATURES, stem, stride=stem, bias=False)
        self.decoder_last = ResidualConvBlock(FULL_RESOLUTION_FEATURES, FULL_RESOLUTION_FEATURES, "instance_noaffine")

        # heads on the 16- (full), 32- (P/s0) and 64-channel (P/(s0*s1)) maps, 3.5; DS heads only with DS.
        # ds_scales/ds_weights are the protocol's members, for the outputs that exist
        self.head = nn.Conv3d(FULL_RESOLUTION_FEATURES, num_classes, 1)
        if deep_supervision:
            self.head_32 = nn.Conv3d(WIDTHS[0], num_classes, 1)
            self.head_64 = nn.Conv3d(WIDTHS[1], num_classes, 1)
            self.ds_scales: list[tuple[float, ...]] = [
                (1.0,) * 3,
                tuple(1.0 / s for s in stem),
                tuple(1.0 / (s * t) for s, t in zip(stem, stages[0])),
            ]
            self.ds_weights: list[float] = [4 / 7, 2 / 7, 1 / 7]
        else:
            self.ds_scales, self.ds_weights = [(1.0,) * 3], [1.0]

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> Any:
        if tuple(x.shape[2:]) != self.patch_size:
            # fail with the reason instead of a tensor-size mismatch deep inside (issue #50 of the authors)
            raise ValueError(
                f"UNETR++ was built for patch {self.patch_size} and cannot take input {tuple(x.shape[2:])}; "
                "use the training patch for sliding-window inference"
            )
        skips = []
        h = self.stem(x)
        for i, stage in enumerate(self.encoder):
            if i > 0:
                h = self.downsample[i - 1](h)
            h = stage(h)
            skips.append(h)
        decoder_maps = []
        for k, (up, stage) in enumerate(zip(self.upsample, self.decoder)):
            h = stage(up(h) + skips[2 - k])  # skips are added, not concatenated (3.5)
            decoder_maps.append(h)
        final = self.decoder_last(self.upsample_last(h) + self.full_resolution(x))

        if self.deep_supervision:
            result: Any = [self.head(final), self.head_32(decoder_maps[2]), self.head_64(decoder_maps[1])]
        else:
            result = self.head(final)
        if return_features:
            return result, {"encoder": skips, "decoder": decoder_maps, "final": final}
        return result


def projection_size(paper_size: int, tokens: int) -> int:
    """The key/value projection size p of one EPA block: the paper's p (64, 32 at the bottleneck), capped at
    the stage's token count N. The paper sizes patches so that N >= p everywhere; for small patches a
    projection N -> p with p > N would only add parameters, never compress, so p = N keeps EPA exact
    attention there (our extension, documented in docs/architectures.md)."""
    return min(paper_size, tokens)


def unetrpp_constraints(
    patch_size: Sequence[int],
    dims: int,
    strides: Sequence[Sequence[int]] | None = None,
    stem_stride: Sequence[int] | None = None,
    stage_strides: Sequence[Sequence[int]] | None = None,
    **_: Any,
) -> list[str]:
    """3D; each axis divisible by stem x stage strides (3.6); a bottleneck of at least
    ``MIN_BOTTLENECK_VOXELS`` voxels (batch norm in training)."""
    if dims != 3:
        return ["unetrpp is 3D only (the paper's network)"]
    stem, stages = map_topology(strides, dims, stem_stride, stage_strides)
    divisor = tuple(s * math.prod(st[a] for st in stages) for a, s in enumerate(stem))
    if any(p % d for p, d in zip(patch_size, divisor)):
        return [f"each axis must be divisible by stem {stem} x stage strides = {divisor}"]
    bottleneck = stage_shapes(patch_size, stem, stages)[-1]
    if math.prod(bottleneck) < MIN_BOTTLENECK_VOXELS:
        return [f"the bottleneck {bottleneck} holds fewer than {MIN_BOTTLENECK_VOXELS} voxels (its batch norm "
                "needs more than one value per channel); a larger patch is needed"]
    # A stage with fewer tokens than the paper's projection size p is allowed: p is capped at the token count
    # (projection_size), so small images (MSD Hippocampus, ~36x50x35) need not be padded to a huge patch.
    return []


def unetrpp_divisor(
    strides: Sequence[Sequence[int]], dims: int, stem_stride: Sequence[int] | None = None,
    stage_strides: Sequence[Sequence[int]] | None = None, **_: Any,
) -> tuple[int, ...]:
    stem, stages = map_topology(strides, dims, stem_stride, stage_strides)
    return tuple(s * math.prod(st[a] for st in stages) for a, s in enumerate(stem))


@register(
    "unetrpp",
    dims=(3,),
    description="UNETR++ (3D): hierarchical efficient paired attention (shared Q/K, spatial attention linear "
    "in tokens + channel attention). Built for ONE patch size: inference must use the training patch; "
    "parameters grow with the patch volume.",
    constraints=unetrpp_constraints,
    divisor=unetrpp_divisor,
    supports_selfreg=True,
    fixed_patch_size=True,
    citation="Shaker et al., UNETR++, IEEE TMI 2024 (arXiv 2212.04497)",
)
def build_unetrpp(
    in_channels: int,
    num_classes: int,
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    features: Sequence[int],
    deep_supervision: bool = True,
    variant: str = "synapse",
    stem_stride: Sequence[int] | None = None,
    stage_strides: Sequence[Sequence[int]] | None = None,
    faithful_sa_order: bool = False,
) -> UNETRPlusPlus:
    stem, stages = map_topology(strides, len(patch_size), stem_stride, stage_strides)
    return UNETRPlusPlus(
        in_channels, num_classes, patch_size, stem, stages, deep_supervision,
        variant=variant, faithful_sa_order=faithful_sa_order,
    )
