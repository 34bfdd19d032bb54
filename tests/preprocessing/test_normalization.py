"""Each normalisation scheme against values computed by hand."""
from __future__ import annotations

import numpy as np
import pytest

from autoseg.contracts.plans import IntensityStats
from autoseg.errors import ConfigurationError
from autoseg.preprocessing.normalization import normalize_channel


def test_zscore_whole_image() -> None:
    image = np.array([[1.0, 3.0], [5.0, 7.0]])  # mean 4, population std sqrt(5)
    out = normalize_channel(image, "zscore")
    np.testing.assert_allclose(out, (image - 4.0) / np.sqrt(5.0), rtol=1e-6)
    assert out.dtype == np.float32
    assert image[0, 0] == 1.0  # input untouched


def test_zscore_inside_mask_zeroes_the_outside() -> None:
    image = np.array([0.0, 2.0, 4.0, 100.0])
    mask = np.array([False, True, True, False])  # mean 3, std 1 from the masked voxels only
    out = normalize_channel(image, "zscore", mask=mask)
    np.testing.assert_allclose(out, [0.0, -1.0, 1.0, 0.0])


def test_ct_clips_then_uses_global_statistics() -> None:
    stats = IntensityStats(mean=10.0, std=5.0, median=0, min=-1000, max=3000, percentile_00_5=-20.0, percentile_99_5=40.0)
    out = normalize_channel(np.array([-1000.0, 0.0, 15.0, 500.0]), "ct", stats=stats)
    np.testing.assert_allclose(out, [-6.0, -2.0, 1.0, 6.0])


def test_ct_without_statistics_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="intensity_stats"):
        normalize_channel(np.zeros(3), "ct")


def test_rescale_rgb_none() -> None:
    np.testing.assert_allclose(normalize_channel(np.array([2.0, 4.0, 6.0]), "rescale_0_1"), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(normalize_channel(np.array([0.0, 51.0, 255.0]), "rgb_0_1"), [0.0, 0.2, 1.0])
    np.testing.assert_array_equal(normalize_channel(np.array([-3.5, 7.0]), "none"), [-3.5, 7.0])
    assert np.all(normalize_channel(np.full(4, 9.0), "zscore") == 0.0)  # constant image: no division by zero


def test_unknown_scheme_names_the_choices() -> None:
    with pytest.raises(ConfigurationError, match="zscore"):
        normalize_channel(np.zeros(3), "zscorre")
