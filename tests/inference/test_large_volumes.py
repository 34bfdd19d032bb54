"""Bounded memory for big volumes with many classes: slab-by-slab restore and its peak memory."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from autoseg.inference import Predictor, predict
from autoseg.io import Geometry, read_segmentation, write_image
from autoseg.preprocessing import preprocess_case, restore_probabilities
from autoseg.preprocessing.case import restore_segmentation_in_slabs
from autoseg.preprocessing.resampling import (
    interpolation_matrix,
    iter_resampled_slabs,
    resample_channels,
)

from tests.inference.conftest import build_tiny_network, make_plans


def test_interpolation_matrix_is_the_resize() -> None:
    rng = np.random.default_rng(0)
    for in_length, out_length, order in [(7, 17, 1), (12, 5, 1), (9, 14, 0), (10, 23, 3), (6, 6, 1)]:
        matrix = interpolation_matrix(in_length, out_length, order)
        values = rng.normal(size=in_length)
        expected = ndimage.zoom(values, out_length / in_length, order=order, mode="reflect", grid_mode=True)
        np.testing.assert_allclose(matrix @ values, expected, atol=1e-12)
        if order <= 1:  # finite support: at most two input rows per output row
            assert (np.count_nonzero(matrix, axis=1) <= 2).all()
    np.testing.assert_array_equal(interpolation_matrix(6, 6, 1), np.eye(6))


@pytest.mark.parametrize(
    "shape, new_shape, order, separate_axis, order_z",
    [
        ((7, 9, 11), (17, 13, 8), 1, None, 0),  # isotropic restore: linear on every axis
        ((7, 9, 11), (17, 13, 8), 1, 0, 0),  # anisotropic: nearest along the coarse first axis
        ((12, 9, 11), (8, 13, 8), 1, 0, 1),  # downsampling the first axis, linear
        ((9, 9, 11), (5, 13, 8), 1, 2, 0),  # the coarse axis is the last one
        ((9, 9, 11), (9, 13, 8), 1, 0, 0),  # first axis unchanged: skipped as resample_volume does
        ((7, 9, 11), (17, 13, 8), 3, None, 0),  # cubic spline: infinite prefilter, truncated matrix
        ((6, 5, 4), (6, 5, 4), 1, None, 0),  # same shape: values copied
    ],
)
def test_slabs_equal_whole_volume_resampling(shape, new_shape, order, separate_axis, order_z) -> None:
    channels = np.random.default_rng(1).normal(size=(3, *shape)).astype(np.float32)
    whole = resample_channels(channels, new_shape, order, separate_axis, order_z)
    for rows in (1, 3, 100):
        slabs = list(iter_resampled_slabs(channels, new_shape, order, separate_axis, order_z, rows_per_slab=rows))
        assert [start for start, _, _ in slabs] == list(range(0, new_shape[0], rows))
        assert all(slab.shape == (3, stop - start, *new_shape[1:]) for start, stop, slab in slabs)
        joined = np.concatenate([slab for _, _, slab in slabs], axis=1)
        if order == 0 or (separate_axis == 0 and order_z == 0) or tuple(shape) == tuple(new_shape):
            np.testing.assert_array_equal(joined, whole)  # copies and nearest rows: bit-identical
        else:
            np.testing.assert_allclose(joined, whole, atol=2e-6, rtol=0)


def test_float16_input_is_converted_row_by_row() -> None:
    channels = np.random.default_rng(2).normal(size=(2, 5, 6, 7)).astype(np.float16)
    whole = resample_channels(channels.astype(np.float32), (9, 4, 7), 1, None, 0)
    joined = np.concatenate([s for _, _, s in iter_resampled_slabs(channels, (9, 4, 7), 1, None, 0, 2)], axis=1)
    np.testing.assert_allclose(joined, whole, atol=2e-6, rtol=0)


def _cropped_anisotropic_case():
    """A real preprocess_case round: crop box inside the image, resampling on every axis."""
    plans = make_plans(3, spacing=(1.5, 1.0, 1.0))
    configuration = plans.configurations["3d_fullres"]
    rng = np.random.default_rng(3)
    image = np.zeros((1, 13, 30, 27), np.float32)
    image[0, 2:12, 3:28, 4:20] = rng.uniform(1, 2, (10, 25, 16))
    geometry = Geometry((13, 30, 27), (3.2, 0.6, 0.9), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    data, _, properties = preprocess_case(image, geometry, plans, configuration)
    return configuration, geometry, data, properties


@pytest.mark.parametrize("slab_bytes", [1, 20_000, 1 << 30])
def test_restore_in_slabs_equals_whole_volume_restore(slab_bytes: int) -> None:
    configuration, geometry, data, properties = _cropped_anisotropic_case()
    assert properties.shape_after_crop != properties.shape_after_resampling  # really resampled
    assert properties.shape_after_crop != properties.shape_before_crop  # really cropped
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(4, *data.shape[1:])).astype(np.float32) * 3
    log_probabilities = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    whole = restore_probabilities(np.exp(log_probabilities), properties, configuration)

    written = np.full((4, *geometry.shape), np.nan, np.float16)
    segmentation = restore_segmentation_in_slabs(log_probabilities, properties, configuration, written, slab_bytes)
    assert segmentation.shape == geometry.shape and segmentation.dtype == np.uint8
    top_two = np.sort(whole, axis=0)[-2:]
    clear = top_two[1] - top_two[0] > 1e-4  # float rounding may only flip exact near-ties
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(segmentation[clear], np.argmax(whole, axis=0)[clear])
    assert not np.isnan(written).any()  # every value written, outside the crop box too
    np.testing.assert_allclose(written.astype(np.float32), whole, atol=1e-3, rtol=0)  # float16 storage
    np.testing.assert_array_equal(written[:, 0, :, :], np.eye(4, dtype=np.float16)[0][:, None, None]
                                  * np.ones((1, *geometry.shape[1:]), np.float16))  # row 0 lies outside the box


def test_restore_in_slabs_2d_image() -> None:
    plans = make_plans(2, spacing=(0.5, 0.5))
    configuration = plans.configurations["2d"]
    image = np.random.default_rng(5).uniform(1, 2, (1, 21, 17)).astype(np.float32)
    geometry = Geometry((21, 17), (0.8, 0.6), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    data, _, properties = preprocess_case(image, geometry, plans, configuration)
    logits = np.random.default_rng(6).normal(size=(3, *data.shape[1:])).astype(np.float32)
    log_probabilities = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    whole = restore_probabilities(np.exp(log_probabilities), properties, configuration)
    written = np.full((3, 21, 17), np.nan, np.float16)  # [K, Y, X]: the dummy Z is the restore's business
    segmentation = restore_segmentation_in_slabs(log_probabilities.astype(np.float16), properties, configuration,
                                                 written)
    assert segmentation.shape == (21, 17)
    agreement = (segmentation == np.argmax(whole, axis=0)).mean()
    assert agreement > 0.99  # float16 input: a few near-ties may flip
    np.testing.assert_allclose(written.astype(np.float32), whole, atol=2e-3, rtol=0)


def test_peak_memory_of_prediction_stays_below_the_slab_bound(tmp_path: Path) -> None:
    """64 x 128 x 128 voxels, 30 classes: float32 probabilities of the whole image would be 126 MB (and 63 MB in
    float16). numpy allocations (tracemalloc sees them; torch's network-grid accumulator it does not) must stay
    within the slab math: three slabs of all classes plus a handful of single-channel volumes."""
    shape, classes = (64, 128, 128), 30
    voxels = int(np.prod(shape))
    plans = make_plans(3, patch=(32, 64, 64), spacing=(2.0, 1.0, 1.0))
    plans.labels = {"background": 0, **{f"organ{k}": k for k in range(1, classes)}}
    predictor = Predictor([build_tiny_network(plans)], plans, plans.configurations["3d_fullres"], 1, device="cpu",
                          mirror=False)
    predictor.restore_slab_bytes = 4 << 20
    image = np.random.default_rng(7).uniform(1.0, 2.0, shape).astype(np.float32)  # no crop: the whole volume
    write_image(image, Geometry(shape, (1.0, 1.0, 1.0), (0.0,) * 3, tuple(np.eye(3).ravel())),
                tmp_path / "in" / "big_0000.nii.gz")
    del image

    tracemalloc.start()
    try:
        report = predict(tmp_path / "in", tmp_path / "out", "unused", "3d_fullres", predictor=predictor,
                         num_workers=1, save_probabilities=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok, report.failures
    float32_volume = 4 * voxels  # one channel of the original grid
    bound = 3 * predictor.restore_slab_bytes + 4 * float32_volume  # 12 MiB + 16 MiB
    assert peak < bound, f"peak {peak / 2**20:.1f} MiB above the slab bound {bound / 2**20:.1f} MiB"
    assert bound < 2 * classes * voxels < 4 * classes * voxels  # the bound excludes any [K, volume] array
    segmentation, _ = read_segmentation(tmp_path / "out" / "big.nii.gz")
    assert segmentation.shape == shape and len(np.unique(segmentation)) > 1
    with np.load(tmp_path / "out" / "big.npz", allow_pickle=False) as npz:
        probabilities = npz["probabilities"]
        assert probabilities.dtype == np.float16 and probabilities.shape == (classes, *shape)
        assert str(npz["file_ending"]) == ".nii.gz"
        top = probabilities[:, :8].astype(np.float32)
    np.testing.assert_allclose(top.sum(0), 1.0, atol=2e-2)
    top_two = np.sort(top, axis=0)[-2:]
    clear = top_two[1] - top_two[0] > 1e-2
    np.testing.assert_array_equal(np.argmax(top, 0)[clear], segmentation[:8][clear])


class AbsurdLogits(nn.Module):
    """Logits +1e5 / -1e5 / 0: beyond float16 on both sides, a log-probability gap no float16 can hold."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = x[:, :1] * 0
        return torch.cat([zero + 1e5, zero - 1e5, zero], dim=1)


def test_absurd_logits_give_no_nan_through_float16_and_the_restore() -> None:
    plans = make_plans(3, patch=(8, 16, 16), spacing=(2.0, 1.0, 1.0))
    predictor = Predictor([AbsurdLogits()], plans, plans.configurations["3d_fullres"], 1, device="cpu", mirror=False)
    image = np.random.default_rng(8).uniform(1.0, 2.0, (1, 9, 20, 17)).astype(np.float32)
    geometry = Geometry((9, 20, 17), (1.0, 1.0, 1.0), (0.0,) * 3, tuple(np.eye(3).ravel()))
    data, _ = predictor.preprocess(image, geometry)
    log_probabilities = predictor.predict_log_probabilities(data)
    assert log_probabilities.dtype == torch.float16 and torch.isfinite(log_probabilities).all()
    segmentation = predictor.predict_segmentation(image, geometry)  # resampled: -inf would turn into NaN
    assert segmentation.shape == (9, 20, 17) and (segmentation == 0).all()
