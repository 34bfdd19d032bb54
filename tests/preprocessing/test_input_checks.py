"""Input checks at the top of preprocess_case (issue 18 item 9): NaN voxels are replaced with a warning, and an
image whose header spacing would make the resampled case absurdly large is refused before any allocation."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from autoseg.dataset.synthetic import SyntheticSpec, make_case
from autoseg.errors import DatasetError
from autoseg.io import Geometry
from autoseg.preprocessing import preprocess_case
from autoseg.preprocessing.case import MAX_RESAMPLED_VOXELS

from .helpers import make_configuration, make_plans

SPEC = SyntheticSpec(num_cases=1, shape=(8, 16, 16), spacing=(2.5, 0.8, 0.8), seed=1)


def test_nan_voxels_are_replaced_by_the_channel_minimum_with_a_warning(caplog) -> None:
    images, label, geometry = make_case(SPEC, 0)
    plans = make_plans([make_configuration()])
    configuration = plans.configuration("3d_fullres")
    poisoned = images.astype(np.float32).copy()
    poisoned[0, 3, 4, 5:9] = np.nan
    poisoned[0, 0, 0, 0] = np.inf
    with caplog.at_level(logging.WARNING, logger="autoseg.preprocessing.case"):
        data, _, _ = preprocess_case(poisoned, geometry, plans, configuration, label, "case_000",
                                     source="imagesTr/case_000_0000.nrrd")
    assert np.isfinite(data).all()
    [record] = [r for r in caplog.records if "NaN" in r.getMessage()]
    assert record.getMessage().startswith("imagesTr/case_000_0000.nrrd: 5 NaN/Inf voxel(s) replaced by their "
                                          "channel's minimum finite intensity")
    # exactly what the image with those voxels set to the minimum gives
    cleaned = poisoned.copy()
    cleaned[~np.isfinite(cleaned)] = np.nanmin(np.where(np.isinf(cleaned), np.nan, cleaned))
    expected, _, _ = preprocess_case(cleaned, geometry, plans, configuration, label, "case_000")
    np.testing.assert_array_equal(data, expected)
    assert np.isnan(poisoned).sum() == 4  # the caller's array is left alone


def test_a_header_spacing_that_would_explode_the_case_is_refused_in_one_line() -> None:
    plans = make_plans([make_configuration(target_spacing=(1.0, 1.0, 1.0))])
    image = np.zeros((1, 10, 50, 50), np.float32)  # tiny in memory: the check must come before any resampling
    geometry = Geometry((10, 50, 50), (100.0, 100.0, 100.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    with pytest.raises(DatasetError) as caught:
        preprocess_case(image, geometry, plans, plans.configuration("3d_fullres"), source="imagesTr/big_0000.nii.gz")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("imagesTr/big_0000.nii.gz: spacing (100.0, 100.0, 100.0) mm resampled to the target "
                              "spacing (1.0, 1.0, 1.0) mm would have shape (1000, 5000, 5000)")
    assert "check the spacing units in the file's header" in message
    # the bound leaves every real image alone: a whole-body CT at its own spacing
    assert 1000 * 512 * 512 < MAX_RESAMPLED_VOXELS / 8
