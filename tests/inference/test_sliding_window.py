"""Sliding-window numerics: Gaussian map, tiling, padding, mirroring, 2D-on-4D."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.inference.sliding_window import (
    compute_tile_starts,
    gaussian_importance_map,
    mirror_axis_sets,
    pad_to_patch,
    sliding_window_predict,
    summed_window_weights,
    window_slices,
)

FP32 = torch.float32  # exact comparisons with hand-made references; the float16 default has its own test


class AsymmetricConv(nn.Module):
    """Not mirror-symmetric: a fixed random conv with an off-centre kernel plus a position ramp."""

    def __init__(self, dims: int, in_channels: int = 2, classes: int = 3) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        torch.manual_seed(1)
        self.conv = conv(in_channels, classes, 3, padding=1)
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        ramp = torch.linspace(0, 1, x.shape[-1])
        return out + ramp  # depends on position along X: flipping changes the answer


class Threshold(nn.Module):
    """Logits [x - 0.5, 0.5 - x] ... class 1 where intensity > 0.5 (known function of the input)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        logit = x[:, :1] - 0.5
        full = torch.cat([-logit, logit], dim=1)
        # deep-supervision style list: only the first (full resolution) output may be used
        return [full, full[(slice(None), slice(None), *[slice(None, None, 2)] * (x.ndim - 2))] * 0 + 100]


def test_gaussian_map_shape_max_positive_symmetric() -> None:
    weights = gaussian_importance_map((7, 10, 12))
    assert weights.dtype == np.float32 and weights.shape == (7, 10, 12)
    assert weights.max() == pytest.approx(1.0)
    assert (weights > 0).all()
    np.testing.assert_array_equal(weights, weights[::-1, ::-1, ::-1])  # exactly symmetric for mirroring
    # sigma = patch/8: one sigma away from the centre along X (12/8 = 1.5 voxels) the weight drops to e^-0.5
    one_d = gaussian_importance_map((12,))
    centre = 5.5
    expected = np.exp(-0.5 * ((np.arange(12) - centre) / 1.5) ** 2)
    np.testing.assert_allclose(one_d, expected / expected.max(), rtol=1e-6)


def test_gaussian_map_underflow_replaced_by_smallest_positive() -> None:
    weights = gaussian_importance_map((64,), sigma_scale=1.0 / 200)  # corners underflow float32
    assert (weights > 0).all()
    assert weights[0] == weights[weights > 0].min()


@pytest.mark.parametrize(
    "shape,patch,step,expected",
    [
        ((10,), (10,), 0.5, [[0]]),
        ((24,), (8,), 0.5, [[0, 4, 8, 12, 16]]),
        ((20,), (8,), 0.5, [[0, 4, 8, 12]]),
        ((21,), (8,), 0.5, [[0, 3, 7, 10, 13]]),  # 13/4 -> 4 steps of 3.25, rounded
        ((9, 30), (8, 16), 1.0, [[0, 1], [0, 14]]),
    ],
)
def test_tile_starts_hand_computed(shape, patch, step, expected) -> None:
    assert compute_tile_starts(shape, patch, step) == expected


@pytest.mark.parametrize("shape,patch,step", [((37, 19, 50), (16, 8, 12), 0.5), ((8, 33, 9), (8, 7, 9), 0.3)])
def test_tiling_covers_every_voxel_with_positive_weight(shape, patch, step) -> None:
    starts = compute_tile_starts(shape, patch, step)
    weights = np.zeros(shape)
    gaussian = gaussian_importance_map(patch)
    for tile in window_slices(starts, patch):
        weights[tile] += gaussian
    assert (weights > 0).all()
    for axis, axis_starts in enumerate(starts):
        assert axis_starts[0] == 0 and axis_starts[-1] == shape[axis] - patch[axis]
        gaps = np.diff(axis_starts)
        assert (gaps <= patch[axis] * step + 1).all()  # never a step much larger than asked


def test_tile_starts_rejects_smaller_image() -> None:
    with pytest.raises(ValueError):
        compute_tile_starts((4, 10), (8, 8))


def test_pad_and_unpad_roundtrip() -> None:
    data = torch.arange(2 * 3 * 5 * 9, dtype=torch.float32).reshape(2, 3, 5, 9)
    padded, unpad = pad_to_patch(data, (6, 4, 12))
    assert tuple(padded.shape) == (2, 6, 5, 12)
    torch.testing.assert_close(padded[unpad], data)
    assert padded.sum() == data.sum()  # zeros only


def test_mirror_axis_sets() -> None:
    assert mirror_axis_sets(2) == [(), (0,), (1,), (0, 1)]
    assert len(mirror_axis_sets(3)) == 8


def test_mirroring_is_exactly_undone_3d() -> None:
    network = AsymmetricConv(3).eval()
    data = torch.randn(2, 8, 12, 16)
    patch = (4, 6, 8)  # exact integer steps (2, 3, 4): flipped image has mirrored tiles
    with torch.inference_mode():
        mirrored = sliding_window_predict(network, data, patch, 3, 3, mirror=True, accumulator_dtype=FP32)
        manual = torch.zeros_like(mirrored)
        for axes in mirror_axis_sets(3):
            flip = [a + 1 for a in axes]
            pred = sliding_window_predict(network, torch.flip(data, flip) if flip else data, patch, 3, 3, mirror=False,
                                          accumulator_dtype=FP32)
            manual += torch.flip(pred, flip) if flip else pred
        manual /= 8
        plain = sliding_window_predict(network, data, patch, 3, 3, mirror=False, accumulator_dtype=FP32)
    torch.testing.assert_close(mirrored, manual, atol=1e-5, rtol=1e-5)
    assert (mirrored - plain).abs().max() > 1e-2  # the network really is not mirror-symmetric


def test_single_window_equals_network_output() -> None:
    network = AsymmetricConv(3).eval()
    data = torch.randn(2, 4, 6, 8)
    with torch.inference_mode():
        pred = sliding_window_predict(network, data, (4, 6, 8), 3, 3, mirror=False, accumulator_dtype=FP32)
        direct = network(data[None])[0]
    torch.testing.assert_close(pred, direct, atol=1e-5, rtol=1e-5)


def test_known_function_with_padding_and_deep_supervision_list() -> None:
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.uniform(0, 1, (1, 3, 5, 7)).astype(np.float32))  # smaller than the patch
    with torch.inference_mode():
        probabilities = sliding_window_predict(Threshold(), data, (4, 8, 8), 3, 2, softmax=True, batch_size=3,
                                               accumulator_dtype=FP32)
    assert tuple(probabilities.shape) == (2, 3, 5, 7)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(3, 5, 7))
    expected = (data[0] > 0.5).long()
    assert torch.equal(probabilities.argmax(0), expected)
    # mean of identical logits: softmax of exactly [0.5 - x, x - 0.5]
    torch.testing.assert_close(probabilities[1], torch.sigmoid(2 * (data[0] - 0.5)), atol=1e-5, rtol=1e-5)


def test_2d_network_predicts_each_slice() -> None:
    network = AsymmetricConv(2).eval()
    data = torch.randn(2, 3, 10, 12)
    with torch.inference_mode():
        pred = sliding_window_predict(network, data, (10, 12), 2, 3, mirror=False, batch_size=2,
                                      accumulator_dtype=FP32)
        for z in range(3):
            torch.testing.assert_close(pred[:, z], network(data[None, :, z])[0], atol=1e-5, rtol=1e-5)
        mirrored = sliding_window_predict(network, data, (10, 12), 2, 3, mirror=True, accumulator_dtype=FP32)
        manual = sum(
            torch.flip(network(torch.flip(data[:, 1][None], [a + 2 for a in axes])), [a + 2 for a in axes])
            if axes else network(data[:, 1][None])
            for axes in mirror_axis_sets(2)
        )[0] / 4
    torch.testing.assert_close(mirrored[:, 1], manual, atol=1e-5, rtol=1e-5)


def test_summed_window_weights_is_the_sum_over_windows() -> None:
    patch, shape = (4, 6), (9, 10)
    tiles = list(window_slices(compute_tile_starts(shape, patch, 0.5), patch))
    gaussian = torch.from_numpy(gaussian_importance_map(patch))
    expected = torch.zeros(shape)
    for tile in tiles:
        expected[tile] += gaussian
    torch.testing.assert_close(summed_window_weights(shape, tiles, gaussian), expected)
    assert float(expected.min()) > 0


def test_float16_accumulator_close_to_float32() -> None:
    """The default float16 accumulator (normalised Gaussian weights) against a float32 one: a tiny random
    U-Net, 3 overlapping windows per axis, 12 classes."""
    from autoseg import networks

    torch.manual_seed(0)
    network = networks.build(networks.NetworkSpec(
        "unet", 1, 12, patch_size=[8, 16, 16], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]], features=[4, 8, 16], deep_supervision=False,
    )).eval()
    data = torch.randn(1, 16, 32, 32)
    with torch.inference_mode():
        half = sliding_window_predict(network, data, (8, 16, 16), 3, 12, mirror=False)
        full = sliding_window_predict(network, data, (8, 16, 16), 3, 12, mirror=False, accumulator_dtype=FP32)
        probabilities = sliding_window_predict(network, data[:, :8], (8, 16, 16), 3, 12, mirror=False, softmax=True)
    assert half.dtype == torch.float16 and full.dtype == torch.float32 and half.shape == (12, 16, 32, 32)
    # the accumulator holds a weighted mean, so the error is relative to the largest logit, not the overlap
    scale = full.abs().max().item()
    assert scale > 1.0 and (half.float() - full).abs().max().item() < 1e-3 * scale
    agreement = (half.float().argmax(0) == full.argmax(0)).float().mean().item()
    assert agreement > 0.999, agreement
    assert (torch.softmax(half.float(), 0) - torch.softmax(full, 0)).abs().max().item() < 3e-3
    # the softmax output (computed slab by slab in float32) stays float16 and sums to one
    assert probabilities.dtype == torch.float16
    torch.testing.assert_close(probabilities.float().sum(0), torch.ones(8, 32, 32), atol=5e-3, rtol=0)


def test_a_one_slice_window_visits_every_slice_once():
    """2D models predict [C, Z, Y, X] with a window one slice deep: step 0.5 must not repeat slices."""
    starts = compute_tile_starts((5, 40, 40), (1, 32, 32), 0.5)
    assert starts[0] == [0, 1, 2, 3, 4]
    assert starts[1] == starts[2] == [0, 8]
