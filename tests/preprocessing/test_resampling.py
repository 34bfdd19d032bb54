"""Resampling numerics: shapes, the separate-axis rule, accuracy, and the one-hot label path."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from autoseg.preprocessing.resampling import (
    choose_separate_axis,
    compute_new_shape,
    resample_channels,
    resample_labels,
    resample_volume,
)


def test_new_shape_keeps_physical_extent() -> None:
    assert compute_new_shape((20, 100, 101), (3.0, 0.5, 0.5), (1.5, 1.0, 1.0)) == (40, 50, 50)  # 50.5 rounds to even
    assert compute_new_shape((1, 10, 10), (999.0, 1.0, 1.0), (999.0, 0.3, 0.3)) == (1, 33, 33)


@pytest.mark.parametrize(
    "spacing, target, forced, expected",
    [
        ((5.0, 1.0, 1.0), (5.0, 1.0, 1.0), None, 0),  # anisotropic original: coarse axis 0
        ((1.0, 1.0, 4.0), (1.0, 1.0, 1.0), None, 2),  # coarse axis need not be the first
        ((1.0, 1.0, 1.0), (1.0, 1.0, 3.5), None, 2),  # isotropic original, anisotropic target
        ((2.0, 2.0, 2.5), (2.0, 2.0, 2.5), None, None),  # below the threshold of 3
        ((4.0, 4.0, 1.0), (4.0, 4.0, 1.0), None, None),  # two coarse axes: no single out-of-plane axis
        ((5.0, 1.0, 1.0), (5.0, 1.0, 1.0), False, None),
        ((1.0, 2.0, 1.0), (1.0, 1.0, 1.0), True, 1),
    ],
)
def test_separate_axis_rule(spacing, target, forced, expected) -> None:
    assert choose_separate_axis(spacing, target, forced, 3.0) == expected


def test_linear_resampling_reproduces_a_linear_ramp() -> None:
    # voxel-edge aligned grids: voxel i of n covers [i, i+1) * extent / n; a linear function of the physical
    # coordinate must come out exactly (away from the outermost half voxel, where the boundary is mirrored)
    z = (np.arange(10) + 0.5) * 3.0  # 10 voxels of 3 mm
    volume = np.broadcast_to(z[:, None, None], (10, 4, 4)).astype(np.float32)
    out = resample_volume(volume, (30, 4, 4), order=1)
    expected = (np.arange(30) + 0.5) * 1.0
    np.testing.assert_allclose(out[2:-2, 0, 0], expected[2:-2], atol=1e-4)


def test_cubic_resampling_of_a_smooth_function_is_accurate() -> None:
    grid = [(np.arange(n) + 0.5) / n for n in (12, 16, 20)]
    f = lambda z, y, x: np.sin(2 * z) + np.cos(3 * y) * x  # noqa: E731
    volume = f(*np.meshgrid(*grid, indexing="ij")).astype(np.float32)
    new = (24, 20, 30)
    out = resample_channels(volume[None], new, order=3)[0]
    fine = [(np.arange(n) + 0.5) / n for n in new]
    truth = f(*np.meshgrid(*fine, indexing="ij"))
    assert out.dtype == np.float32
    interior = (slice(6, -6),) * 3  # the mirrored boundary rings a few voxels into the volume
    assert np.abs(out - truth)[interior].max() < 1e-3
    linear = resample_channels(volume[None], new, order=1)[0]
    assert np.abs(out - truth)[interior].max() < np.abs(linear - truth)[interior].max() / 5


def test_separate_axis_uses_its_own_order() -> None:
    volume = np.zeros((4, 8, 8), np.float32)
    volume[1] = 1.0
    # nearest along z: every output slice is an exact copy of one input slice (no blending between slices)
    out = resample_volume(volume, (8, 8, 8), order=3, separate_axis=0, order_z=0)
    assert set(np.unique(out).tolist()) <= {0.0, 1.0}
    assert out[:, 3, 3].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    # without separation the cubic spline blends neighbouring slices
    assert len(np.unique(resample_volume(volume, (8, 8, 8), order=3))) > 2


@pytest.mark.parametrize("position", [4, 5])
def test_one_voxel_thick_structure_survives_downsampling(position: int) -> None:
    label = np.zeros((10, 6, 6), np.int8)
    label[position] = 1
    out = resample_labels(label, (5, 6, 6), order=1)
    # each output slice averages two input slices: the structure covers half of one and is kept (ties go
    # to foreground), whichever parity it sits at; nearest neighbour keeps only one parity
    assert (out == 1).any(axis=(1, 2)).tolist() == [i == position // 2 for i in range(5)]


def test_label_resampling_equals_brute_force_one_hot_argmax() -> None:
    rng = np.random.default_rng(1)
    label = ndimage.zoom(rng.integers(0, 4, (5, 6, 7)), 3, order=0).astype(np.int8)  # blobs of 4 classes
    new_shape = (11, 23, 17)
    ours = resample_labels(label, new_shape, order=1, separate_axis=0, order_z=0)
    one_hot = np.stack([resample_volume((label == k).astype(np.float32), new_shape, 1, 0, 0) for k in range(4)])
    best_foreground = one_hot[1:].max(axis=0)
    brute = np.where(one_hot[0] > best_foreground, 0, one_hot[1:].argmax(axis=0) + 1)
    assert ours.dtype == np.int8
    assert (ours == brute).mean() > 0.999  # only float rounding at exact ties may differ
    np.testing.assert_allclose(one_hot.sum(axis=0), 1.0, atol=1e-5)  # why background can be implied


def test_label_resampling_identity_and_single_class() -> None:
    label = np.ones((3, 4, 5), np.int8)
    assert np.all(resample_labels(label, (6, 8, 10)) == 1)
    label[0, 0, 0] = 2
    np.testing.assert_array_equal(resample_labels(label, label.shape), label)
