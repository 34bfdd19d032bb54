"""Crop to nonzero and back."""
from __future__ import annotations

import numpy as np

from autoseg.preprocessing.cropping import bounding_box, crop_to_box, nonzero_mask, uncrop


def test_nonzero_mask_uses_all_channels_and_fills_holes() -> None:
    data = np.zeros((2, 7, 9), np.float32)
    data[0, 1:6, 2:7] = 1.0
    data[0, 3, 4] = 0.0  # a hole inside channel 0: filled
    data[1, 6, 8] = -2.0  # negative values count as nonzero, in another channel
    mask = nonzero_mask(data)
    assert mask[3, 4] and mask[6, 8] and not mask[0, 0]
    assert mask.sum() == 25 + 1
    assert bounding_box(mask) == [[1, 7], [2, 9]]


def test_crop_then_uncrop_restores_the_array_with_fill() -> None:
    rng = np.random.default_rng(0)
    array = rng.normal(size=(3, 6, 8, 5)).astype(np.float32)
    box = [[1, 4], [2, 8], [0, 3]]
    cropped = crop_to_box(array, box)
    assert cropped.shape == (3, 3, 6, 3)
    back = uncrop(cropped, box, (6, 8, 5), fill=[1.0, 0.0, 0.0])
    np.testing.assert_array_equal(back[:, 1:4, 2:8, 0:3], array[:, 1:4, 2:8, 0:3])
    assert np.all(back[0, 0] == 1.0) and np.all(back[1:, 0] == 0.0) and np.all(back[0, :, :, 3:] == 1.0)


def test_empty_mask_keeps_the_whole_image() -> None:
    assert bounding_box(np.zeros((3, 4, 5), bool)) == [[0, 3], [0, 4], [0, 5]]
