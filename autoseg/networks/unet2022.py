"""UNet-2022: U-shaped network of "parallel non-isomorphic" blocks (window attention || depthwise conv). 2D only.

Specification: the paper (Guo et al., arXiv 2210.15566). The paper and its
code are 2D and are compared with nnU-Net 2D (issue #2 of the authors' repository); we register 2D only. A 3D
version would be our own extrapolation with no published settings, so it is not offered (section 2.10).

Shape (E = embedding width, stem 4 or 8): conv stem to H/stem at E channels; 4 encoder stages of 3 blocks at
E, 2E, 4E, 8E; 3 decoder stages (patch expanding + skip *addition* + 3 blocks) at 4E, 2E, E; a transposed-conv
head per decoder stage giving logits at 1/4, 1/2 and full resolution.

Our additions: windows may be rectangular (one size per axis) so non-square patches tile exactly; with square
windows everything is as in the paper.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from autoseg.networks.blocks import ChannelLayerNorm, DropPath
from autoseg.networks.registry import register

# 2.1: Tiny / Base / Large embedding widths; heads are E/32 doubling per stage
SIZES = {"tiny": 96, "base": 128, "large": 192}


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"a 2D window needs 2 sizes, got {value}")
    return value  # type: ignore[return-value]


def stage_sizes(patch_size: Sequence[int], stem: int) -> list[tuple[int, int]]:
    """Feature-map size per encoder stage: ``patch / (stem * 2^i)`` for i = 0..3 (section 2.1)."""
    return [tuple(p // (stem * 2**i) for p in patch_size) for i in range(4)]  # type: ignore[misc]


def default_windows(patch_size: Sequence[int], stem: int) -> list[tuple[int, int]]:
    """The repository's pattern (2.8): windows ``[s3, s3, s2, s3]`` with ``s_i`` the stage sizes, i.e. global
    attention at the two deepest stages and stage-3-sized windows above (224 px, stem 4 -> [7, 7, 14, 7])."""
    sizes = stage_sizes(patch_size, stem)
    return [sizes[3], sizes[3], sizes[2], sizes[3]]


def _clip(window: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(window, shift) for a stage: a window at least the stage size becomes the stage size and shifting is
    disabled on that axis (2.3 "window clipping"); otherwise shift by floor(w/2) (Swin)."""
    clipped = tuple(min(w, s) for w, s in zip(window, size))
    shift = tuple(0 if s <= w else w // 2 for w, s in zip(window, size))
    return clipped, shift  # type: ignore[return-value]


class ConvNeXtSubBlock(nn.Module):
    """Sub-block (a), 2.3: depthwise 7x7 -> LN(eps 1e-6) -> Linear 4C -> GELU -> Linear C -> layer scale 1e-6
    -> residual. It carries the block's MLP."""

    def __init__(self, channels: int, drop_path: float) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.expand = nn.Linear(channels, 4 * channels)
        self.act = nn.GELU()
        self.reduce = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 1e-6))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(x).permute(0, 2, 3, 1)  # channels last for LayerNorm/Linear
        y = self.reduce(self.act(self.expand(self.norm(y)))) * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ParallelAttentionSubBlock(nn.Module):
    """Sub-block (b), 2.3: LN -> [window self-attention || depthwise 7x7 conv] summed inside each window before
    the output projection -> residual. The depthwise conv sees the normalised, padded, shifted map (2.13)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        window: tuple[int, int],
        shift: tuple[int, int],
        drop_path: float,
        size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} heads")
        self.heads = heads
        self.window = window
        self.shift = shift
        self.norm = ChannelLayerNorm(channels, eps=1e-5)
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        wy, wx = window
        # relative-position bias (Swin convention): one learned value per head and 2D offset
        self.relative_bias = nn.Parameter(torch.zeros((2 * wy - 1) * (2 * wx - 1), heads))
        nn.init.trunc_normal_(self.relative_bias, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(wy), torch.arange(wx), indexing="ij")).flatten(1)
        offsets = coords[:, :, None] - coords[:, None, :]  # 2, N, N
        index = (offsets[0] + wy - 1) * (2 * wx - 1) + (offsets[1] + wx - 1)
        self.register_buffer("relative_index", index, persistent=False)
        self.drop_path = DropPath(drop_path)
        # the shift mask depends only on the (padded) stage size: precompute it for the build patch
        self.padded_size = None
        if size is not None and any(shift):
            self.padded_size = tuple(s + (-s) % w for s, w in zip(size, window))
            self.register_buffer("shift_mask", self._shift_mask(*self.padded_size), persistent=False)

    def _partition(self, x: torch.Tensor) -> torch.Tensor:
        """``B, C, H, W`` (H, W multiples of the window) -> ``B * nW, wy * wx, C``."""
        b, c, h, w = x.shape
        wy, wx = self.window
        x = x.reshape(b, c, h // wy, wy, w // wx, wx).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(-1, wy * wx, c)

    def _merge(self, x: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        wy, wx = self.window
        c = x.shape[-1]
        x = x.reshape(b, h // wy, w // wx, wy, wx, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    def _shift_mask(self, h: int, w: int) -> torch.Tensor:
        """-100 between tokens of a window that come from different regions of the rolled map (Swin)."""
        wy, wx = self.window
        sy, sx = self.shift
        region = torch.zeros(h, w, device=self.relative_index.device)
        label = 0
        for ys in ((0, h - wy), (h - wy, h - sy), (h - sy, h)) if sy else ((0, h),):
            for xs in ((0, w - wx), (w - wx, w - sx), (w - sx, w)) if sx else ((0, w),):
                region[ys[0]: ys[1], xs[0]: xs[1]] = label
                label += 1
        windows = self._partition(region[None, None]).squeeze(-1)  # nW, N
        different = windows[:, :, None] != windows[:, None, :]
        return different.float() * -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        wy, wx = self.window
        y = self.norm(x)
        pad_y, pad_x = (-h) % wy, (-w) % wx
        if pad_y or pad_x:
            y = F.pad(y, (0, pad_x, 0, pad_y))
        hp, wp = h + pad_y, w + pad_x
        shifted = any(self.shift)
        if shifted:
            y = torch.roll(y, shifts=(-self.shift[0], -self.shift[1]), dims=(2, 3))
        depthwise = self._partition(self.depthwise(y))  # B*nW, N, C

        tokens = self._partition(y)
        n = tokens.shape[1]
        qkv = self.qkv(tokens).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_bias[self.relative_index.reshape(-1)].reshape(n, n, self.heads).permute(2, 0, 1)
        mask = bias[None].to(qkv.dtype)  # 1, heads, N, N
        if shifted:
            n_windows = (hp // wy) * (wp // wx)
            # another input size than the build patch (allowed: the network is not size-bound) recomputes it
            shift_mask = self.shift_mask if (hp, wp) == self.padded_size else self._shift_mask(hp, wp)
            shift_mask = shift_mask.to(qkv.dtype)  # nW, N, N
            mask = (mask + shift_mask[:, None]).repeat(b, 1, 1, 1)  # B*nW, heads, N, N
            mask = mask.reshape(b * n_windows, self.heads, n, n)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        attended = attended.transpose(1, 2).reshape(-1, n, c)
        out = self.proj(attended + depthwise)  # 2.3 step 6: sum before the projection

        out = self._merge(out, b, hp, wp)
        if shifted:
            out = torch.roll(out, shifts=self.shift, dims=(2, 3))
        out = out[:, :, :h, :w]
        return x + self.drop_path(out)


class UNet2022Block(nn.Sequential):
    """One block = sub-block (a) then sub-block (b), both with the same stochastic-depth rate (2.3)."""

    def __init__(self, channels: int, heads: int, window: tuple[int, int], shift: tuple[int, int],
                 drop_path: float, size: tuple[int, int] | None = None) -> None:
        super().__init__(
            ConvNeXtSubBlock(channels, drop_path),
            ParallelAttentionSubBlock(channels, heads, window, shift, drop_path, size),
        )


class UNet2022Stage(nn.Sequential):
    """``depth`` blocks; odd-indexed blocks use shifted windows unless the window covers the stage (2.3)."""

    def __init__(self, channels: int, heads: int, window: tuple[int, int], size: tuple[int, int],
                 drop_paths: Sequence[float]) -> None:
        clipped, shift = _clip(window, size)
        super().__init__(*[
            UNet2022Block(channels, heads, clipped, shift if i % 2 else (0, 0), rate, size)
            for i, rate in enumerate(drop_paths)
        ])


def _linspace(end: float, count: int) -> list[float]:
    """Stochastic-depth rates 0 -> ``end`` (plain Python: also works while building on the meta device)."""
    return [end * k / (count - 1) if count > 1 else 0.0 for k in range(count)]


def _stem_sub_block(in_ch: int, out_ch: int, last: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1), nn.GELU(), ChannelLayerNorm(out_ch),
                               nn.Conv2d(out_ch, out_ch, 3, padding=1)]
    if not last:
        layers += [nn.GELU(), ChannelLayerNorm(out_ch)]
    return layers


class UNet2022(nn.Module):
    """UNet-2022 (2D), a :class:`~autoseg.networks.protocol.SegmentationNetwork`.

    Options: ``size`` tiny/base/large (E 96/128/192) or ``embed_dim``; ``stem`` 4 or 8;
    ``windows`` (4 stage windows, int or (y, x); default from the patch, see :func:`default_windows`);
    ``drop_path_rate`` (0.2, section 2.3)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        patch_size: Sequence[int],
        deep_supervision: bool = True,
        size: str = "tiny",
        embed_dim: int | None = None,
        stem: int = 4,
        windows: Sequence[int | Sequence[int]] | None = None,
        depths: Sequence[int] = (3, 3, 3, 3),
        drop_path_rate: float = 0.2,
    ) -> None:
        super().__init__()
        if stem not in (4, 8):
            raise ValueError(f"stem must be 4 or 8, got {stem}")
        embed = embed_dim or SIZES[size.lower()]
        widths = [embed * 2**i for i in range(4)]
        heads = [w // 32 for w in widths]  # 2.1: h = E/32 doubling per stage
        self.patch_size = tuple(patch_size)
        self.deep_supervision = deep_supervision
        sizes = stage_sizes(patch_size, stem)
        windows = [_pair(w) for w in (windows or default_windows(patch_size, stem))]

        ladder = [in_channels] + [embed // 2**k for k in range(int(math.log2(stem)) - 1, -1, -1)]
        stem_layers: list[nn.Module] = []
        for k in range(len(ladder) - 1):
            stem_layers += _stem_sub_block(ladder[k], ladder[k + 1], last=k == len(ladder) - 2)
        stem_layers.append(ChannelLayerNorm(embed))  # "patch norm"
        self.stem = nn.Sequential(*stem_layers)

        encoder_rates = _linspace(drop_path_rate, sum(depths))
        self.encoder = nn.ModuleList()
        self.skip_norms = nn.ModuleList()
        self.downsample = nn.ModuleList()
        start = 0
        for i in range(4):
            rates = encoder_rates[start: start + depths[i]]
            start += depths[i]
            self.encoder.append(UNet2022Stage(widths[i], heads[i], windows[i], sizes[i], rates))
            self.skip_norms.append(ChannelLayerNorm(widths[i]))
            if i < 3:
                # 2.4: GELU -> LN -> 3x3 stride-2 conv, on the un-normalised stage output
                self.downsample.append(nn.Sequential(
                    nn.GELU(), ChannelLayerNorm(widths[i]), nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1)
                ))

        decoder_rates = _linspace(drop_path_rate, sum(depths[:3]))
        self.expand = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for i in (2, 1, 0):  # decoder mirrors encoder stages 2, 1, 0; full resolution gets the smallest rates
            rates = decoder_rates[sum(depths[:i]): sum(depths[:i + 1])]
            self.expand.append(nn.Sequential(
                ChannelLayerNorm(widths[i + 1]), nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            ))
            self.decoder.append(UNet2022Stage(widths[i], heads[i], windows[i], sizes[i], rates))
            self.heads.append(self._head(widths[i], num_classes, stem))

        # protocol members: heads give logits at 1/4, 1/2, 1 of the input (2.6), returned highest resolution
        # first; without deep supervision only the full-resolution one
        self.ds_scales: list[tuple[float, ...]] = [(1.0, 1.0), (0.5, 0.5), (0.25, 0.25)]
        self.ds_weights: list[float] = [4 / 7, 2 / 7, 1 / 7]
        if not deep_supervision:
            self.ds_scales, self.ds_weights = self.ds_scales[:1], [1.0]
        self.apply(self._init)

    @staticmethod
    def _head(channels: int, num_classes: int, stem: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        if stem == 8:  # one "up-projection" sub-block before the x4 transposed conv (2.6)
            layers += [nn.ConvTranspose2d(channels, channels // 2, 2, stride=2), nn.GELU(),
                       ChannelLayerNorm(channels // 2), nn.Conv2d(channels // 2, channels // 2, 3, padding=1),
                       nn.GELU(), ChannelLayerNorm(channels // 2)]
            channels //= 2
        layers.append(nn.ConvTranspose2d(channels, num_classes, 4, stride=4))
        return nn.Sequential(*layers)

    @staticmethod
    def _init(module: nn.Module) -> None:
        # transformer convention (Swin/ConvNeXt): truncated normal 0.02 for linear layers, zero bias
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> Any:
        h = self.stem(x)
        skips = []
        for i, stage in enumerate(self.encoder):
            h = stage(h)
            skips.append(self.skip_norms[i](h))
            if i < 3:
                h = self.downsample[i](h)
        h = skips[3]  # 2.5: the decoder starts from the normalised bottleneck output
        decoder_maps = []
        for k, (expand, stage) in enumerate(zip(self.expand, self.decoder)):
            h = stage(expand(h) + skips[2 - k])
            decoder_maps.append(h)
        if self.deep_supervision:
            result: Any = [head(m) for head, m in zip(self.heads, decoder_maps)][::-1]
        else:
            result = self.heads[-1](decoder_maps[-1])
        if return_features:
            return result, {"encoder": skips, "decoder": decoder_maps[:-1], "final": decoder_maps[-1]}
        return result


def unet2022_constraints(
    patch_size: Sequence[int],
    dims: int,
    strides: Sequence[Sequence[int]] | None = None,
    stem: int = 4,
    windows: Sequence[int | Sequence[int]] | None = None,
    **_: Any,
) -> list[str]:
    """2D only; each axis divisible by 8 * stem; every stage size a multiple of its window or not larger (2.8)."""
    if dims != 2:
        return ["unet2022 is 2D only (the paper's network; no validated 3D version exists)"]
    problems = []
    divisor = 8 * stem
    if any(p % divisor for p in patch_size):
        problems.append(f"each axis must be divisible by 8 * stem = {divisor}")
        return problems
    windows = [_pair(w) for w in (windows or default_windows(patch_size, stem))]
    for i, (size, window) in enumerate(zip(stage_sizes(patch_size, stem), windows)):
        clipped, _ = _clip(window, size)
        if any(s % w for s, w in zip(size, clipped)):
            problems.append(f"stage {i} size {size} is not a multiple of its window {window}")
    return problems


def unet2022_divisor(
    strides: Sequence[Sequence[int]], dims: int, stem: int = 4,
    windows: Sequence[int | Sequence[int]] | None = None, **_: Any,
) -> tuple[int, ...]:
    """8 * stem per axis; explicit windows add ``w_i * stem * 2^i`` (windows default to tiling exactly)."""
    divisors = [8 * stem] * dims
    for i, window in enumerate(windows or []):
        for axis, w in enumerate(_pair(window)):
            divisors[axis] = math.lcm(divisors[axis], w * stem * 2**i)
    return tuple(divisors)


@register(
    "unet2022",
    dims=(2,),
    description="UNet-2022 (2D only): blocks of window self-attention in parallel with depthwise convolution "
    "plus a ConvNeXt MLP; fixed topology (stem 4/8 then 3 halvings), ignores the planner's strides/features.",
    constraints=unet2022_constraints,
    divisor=unet2022_divisor,
    supports_selfreg=True,
    citation="Guo et al., UNet-2022: Exploring Dynamics in Non-isomorphic Architecture, arXiv 2210.15566",
)
def build_unet2022(
    in_channels: int,
    num_classes: int,
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    features: Sequence[int],
    deep_supervision: bool = True,
    size: str = "tiny",
    embed_dim: int | None = None,
    stem: int = 4,
    windows: Sequence[int | Sequence[int]] | None = None,
    drop_path_rate: float = 0.2,
) -> UNet2022:
    # the topology is the paper's (section 2.1); the planner's strides/kernels/features only fixed the patch
    return UNet2022(
        in_channels, num_classes, patch_size, deep_supervision, size=size, embed_dim=embed_dim, stem=stem,
        windows=windows, drop_path_rate=drop_path_rate,
    )
