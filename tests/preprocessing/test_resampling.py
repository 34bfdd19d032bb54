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
    resample_probabilities,
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


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


def _ball_probabilities(shape, radius_mm, spacing, slope):
    """Two-class softmax of a network that is sure of itself: logit gap = slope x signed distance (mm)."""
    centres = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    zz, yy, xx = np.meshgrid(*centres, indexing="ij")
    middle = [n * s / 2 for n, s in zip(shape, spacing)]
    distance = radius_mm - np.sqrt((zz - middle[0]) ** 2 + (yy - middle[1]) ** 2 + (xx - middle[2]) ** 2)
    return _softmax(np.stack([np.zeros_like(distance), slope * distance])), distance > 0


@pytest.mark.parametrize("radius_mm", [5.3, 6.8, 8.1])
def test_probability_upsampling_keeps_boundaries_a_confident_network_placed(radius_mm: float) -> None:
    # a ball predicted on a 1.6 mm grid and brought to 0.7 mm: interpolating saturated probabilities moves the
    # boundary to where the 0.5 crossing of a linear blend of 0s and 1s falls; interpolating in log space
    # (the logits) keeps it where the logit gap changes sign, i.e. on the ball's surface
    coarse, coarse_spacing = (12, 12, 12), 1.6
    fine = tuple(int(round(n * coarse_spacing / 0.7)) for n in coarse)
    fine_spacing = coarse[0] * coarse_spacing / fine[0]
    probabilities, _ = _ball_probabilities(coarse, radius_mm, (coarse_spacing,) * 3, slope=8.0)
    _, truth = _ball_probabilities(fine, radius_mm, (fine_spacing,) * 3, slope=8.0)

    def dice(a: np.ndarray) -> float:
        return 2 * (a & truth).sum() / (a.sum() + truth.sum())

    log_domain = resample_probabilities(probabilities, fine, order=1).argmax(axis=0) == 1
    linear = resample_channels(probabilities, fine, order=1).argmax(axis=0) == 1
    assert dice(log_domain) > 0.98  # what is left: linear interpolation cuts the sphere's curvature
    assert dice(log_domain) > dice(linear) + 0.01
    # where the boundary lands depends on where the logit gap changes sign, not on how steep it is
    less_sure, _ = _ball_probabilities(coarse, radius_mm, (coarse_spacing,) * 3, slope=2.0)
    np.testing.assert_array_equal(resample_probabilities(less_sure, fine, order=1).argmax(axis=0) == 1, log_domain)


def test_probability_resampling_returns_distributions_without_nan() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 40, (3, 6, 7, 8)).astype(np.float32)
    logits[1, 2, 3, 4] = 500.0  # float32 softmax underflows to exact zeros for the other classes here
    probabilities = _softmax(logits)
    assert (probabilities == 0).any()
    for separate_axis in (None, 0):
        out = resample_probabilities(probabilities, (11, 13, 9), order=1, separate_axis=separate_axis)
        assert out.shape == (3, 11, 13, 9) and out.dtype == np.float32
        assert np.isfinite(out).all() and out.min() >= 0
        np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)


def test_probability_resampling_of_one_hot_input_matches_linear_argmax() -> None:
    # one-hot input: log p is an affine function of p, so the classes come out as linear interpolation gives them
    rng = np.random.default_rng(4)
    label = ndimage.zoom(rng.integers(0, 3, (4, 5, 6)), 3, order=0)
    one_hot = np.stack([(label == k) for k in range(3)]).astype(np.float32)
    new_shape = (17, 11, 23)
    linear = resample_channels(one_hot, new_shape, order=1)
    ours = resample_probabilities(one_hot, new_shape, order=1)
    top_two = np.sort(linear, axis=0)[-2:]
    decided = top_two[1] - top_two[0] > 1e-4  # exact ties may break either way in float rounding
    assert decided.mean() > 0.9
    np.testing.assert_array_equal(ours.argmax(axis=0)[decided], linear.argmax(axis=0)[decided])


def test_probability_resampling_to_the_same_shape_is_exact() -> None:
    probabilities = _softmax(np.random.default_rng(5).normal(0, 3, (2, 3, 4, 5)))
    out = resample_probabilities(probabilities, (3, 4, 5), order=1)
    np.testing.assert_array_equal(out, probabilities)
    assert out is not probabilities
