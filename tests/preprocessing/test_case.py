"""preprocess_case and its inverse on synthetic cases: shapes, geometry, Dice of the round trip."""
from __future__ import annotations

import numpy as np
import pytest

from autoseg.contracts.plans import IntensityStats
from autoseg.dataset.cases import list_training_cases
from autoseg.dataset.spec import load_dataset_spec
from autoseg.dataset.synthetic import SyntheticSpec, generate, make_case
from autoseg.io import Geometry, read_image, read_segmentation
from autoseg.preprocessing import preprocess_case, restore_probabilities, restore_segmentation
from autoseg.preprocessing.case import CLASS_LOCATION_SAMPLES, sample_class_locations

from .helpers import dice, make_configuration, make_plans

ANISOTROPIC = SyntheticSpec(shape=(16, 40, 40), spacing=(3.0, 0.7, 0.7), oblique=True, seed=3)


def _one_hot(label: np.ndarray, num_classes: int) -> np.ndarray:
    return np.stack([(label == k) for k in range(num_classes)]).astype(np.float32)


@pytest.mark.parametrize("index", range(4))
def test_round_trip_to_a_finer_grid_is_lossless(index: int) -> None:
    # random anisotropic, oblique cases; the target grid is finer on every axis (z upsampled with the
    # separate nearest-neighbour rule), so going back must reproduce the label almost exactly
    configuration = make_configuration(target_spacing=(1.5, 0.5, 0.5))
    plans = make_plans([configuration])
    image, label, geometry = make_case(ANISOTROPIC, index)
    data, stored, properties = preprocess_case(image, geometry, plans, configuration, label=label, case_id="c")
    assert data.dtype == np.float32 and stored.dtype == np.int8
    assert data.shape[1:] == stored.shape[1:] == tuple(properties.shape_after_resampling)
    assert data.shape[1] > geometry.shape[0]  # z really was upsampled

    restored = restore_segmentation(stored, properties, configuration)
    assert restored.shape == geometry.shape
    for value in (1, 2):
        assert dice(restored, label, value) > 0.98
    assert properties.geometry == geometry  # origin/direction travel untouched
    assert properties.geometry.mismatch(geometry) == []


@pytest.mark.parametrize("index", range(3))
def test_round_trip_at_median_spacing_with_cropping(index: int) -> None:
    # planner-like target (the dataset median): some cases are downsampled, which loses up to a voxel at
    # boundaries; objects are made bigger so that loss stays small. Zero padding exercises crop/uncrop.
    spec = SyntheticSpec(shape=(32, 64, 64), spacing=(2.0, 0.8, 0.8), oblique=True, seed=11)
    configuration = make_configuration(target_spacing=(2.0, 0.8, 0.8))
    plans = make_plans([configuration])
    image, label, geometry = make_case(spec, index)
    pad = ((0, 0), (2, 3), (5, 1), (0, 4))
    image = np.pad(image, pad)
    label = np.pad(label, pad[1:])
    geometry = Geometry(label.shape, geometry.spacing, geometry.origin, geometry.direction)

    data, stored, properties = preprocess_case(image, geometry, plans, configuration, label=label)
    assert properties.shape_before_crop == list(label.shape)
    assert properties.bbox[0][0] == 2 and properties.bbox[1][0] == 5 and properties.bbox[2][1] == label.shape[2] - 4
    restored = restore_segmentation(stored, properties, configuration)
    assert restored.shape == label.shape
    assert np.all(restored[:2] == 0) and np.all(restored[:, :, -4:] == 0)
    for value in (1, 2):
        assert dice(restored, label, value) > 0.95


def test_restore_probabilities_sums_to_one_and_matches_segmentation() -> None:
    configuration = make_configuration(target_spacing=(1.5, 0.5, 0.5))
    plans = make_plans([configuration])
    image, label, geometry = make_case(ANISOTROPIC, 1)
    image = np.pad(image, ((0, 0), (1, 1), (3, 0), (0, 2)))
    label = np.pad(label, ((1, 1), (3, 0), (0, 2)))
    geometry = Geometry(label.shape, geometry.spacing, geometry.origin, geometry.direction)
    _, stored, properties = preprocess_case(image, geometry, plans, configuration, label=label)

    probabilities = restore_probabilities(_one_hot(stored[0], 3), properties, configuration)
    assert probabilities.shape == (3, *geometry.shape) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert np.all(probabilities[0, 0] == 1.0) and np.all(probabilities[1:, 0] == 0.0)  # un-cropped: background
    from_probabilities = probabilities.argmax(axis=0)
    for value in (1, 2):
        assert dice(from_probabilities, label, value) > 0.98


def test_two_d_configuration_keeps_z_of_3d_data() -> None:
    configuration = make_configuration(name="2d", dims=2, target_spacing=(0.5, 0.5))
    plans = make_plans([configuration])
    image, label, geometry = make_case(ANISOTROPIC, 0)
    data, stored, properties = preprocess_case(image, geometry, plans, configuration, label=label)
    assert data.shape[1] == geometry.shape[0]
    assert properties.spacing_after_resampling == [geometry.spacing[0], 0.5, 0.5]
    restored = restore_segmentation(stored, properties, configuration)
    for value in (1, 2):
        assert dice(restored, label, value) > 0.98


@pytest.mark.parametrize("rgb", [False, True])
def test_two_d_png_cases(tmp_path, rgb: bool) -> None:
    spec = SyntheticSpec(num_cases=1, dims=2, shape=(48, 40), spacing=(1.0, 1.0), rgb=rgb, file_ending=".png")
    raw = generate(tmp_path / "raw", spec)
    case = list_training_cases(raw, load_dataset_spec(raw))[0]
    image, geometry = read_image(case.image_files)
    label, _ = read_segmentation(case.label_file)
    channels = 3 if rgb else 1
    assert image.shape == (channels, *geometry.shape) and geometry.dims == 2
    names = {str(c): n for c, n in enumerate(("R", "G", "B"))} if rgb else {"0": "MRI"}
    scheme = ("rgb_0_1",) * 3 if rgb else ("zscore",)
    configuration = make_configuration(name="2d", dims=2, target_spacing=(0.5, 0.5), normalization=scheme)
    plans = make_plans([configuration], channel_names=names, file_ending=".png")

    data, stored, properties = preprocess_case(image, geometry, plans, configuration, label=label)
    assert data.shape[:2] == (channels, 1) and stored.shape[:2] == (1, 1)
    assert properties.shape_before_crop[0] == 1 and properties.bbox[0] == [0, 1]
    assert data.shape[2] == round(properties.shape_after_crop[1] * 2)  # 1 mm -> 0.5 mm in-plane
    if rgb:
        assert -0.05 <= data.min() and data.max() <= 1.05  # /255; cubic over/undershoot of a few percent
    restored = restore_segmentation(stored, properties, configuration)
    assert restored.shape == geometry.shape
    for value in (1, 2):
        assert dice(restored, label, value) > 0.98
    probabilities = restore_probabilities(_one_hot(stored[0], 3), properties, configuration)
    assert probabilities.shape == (3, *geometry.shape)


def test_class_locations_lie_inside_their_class() -> None:
    configuration = make_configuration(target_spacing=(1.5, 0.5, 0.5))
    plans = make_plans([configuration])
    image, label, geometry = make_case(ANISOTROPIC, 2)
    _, stored, properties = preprocess_case(image, geometry, plans, configuration, label=label)
    seg = stored[0]
    assert set(properties.class_locations) == {"1", "2"}
    for key, locations in properties.class_locations.items():
        points = np.asarray(locations)
        count = int((seg == int(key)).sum())
        assert len(points) == max(min(CLASS_LOCATION_SAMPLES, count), int(np.ceil(count * 0.01)))
        assert np.all(seg[points[:, 0], points[:, 1], points[:, 2]] == int(key))
        assert len({tuple(p) for p in locations}) == len(locations)  # drawn without replacement


def test_class_location_sampling_rules() -> None:
    label = np.zeros((10, 100, 100), np.int8)
    label[:, :50] = 1  # 50,000 voxels -> 10,000 samples (cap), not all
    label[0, 0, 60:63] = 2  # 3 voxels -> all of them
    locations = sample_class_locations(label, [1, 2, 3], num_samples=10_000)
    assert len(locations["1"]) == 10_000 and len(locations["2"]) == 3 and locations["3"] == []
    big = np.ones((20, 100, 100), np.int8)  # 200,000 voxels: 1 % = 2,000 < 10,000 -> 10,000
    assert len(sample_class_locations(big, [1], num_samples=1_000)["1"]) == 2_000  # at least 1 %
    again = sample_class_locations(label, [1, 2, 3], num_samples=10_000)
    assert again == locations  # seeded


def test_single_image_path_equals_training_path() -> None:
    configuration = make_configuration(target_spacing=(2.0, 0.6, 0.6), use_mask_for_norm=(True,))
    plans = make_plans([configuration])
    image, label, geometry = make_case(ANISOTROPIC, 0)
    with_label, _, properties_train = preprocess_case(image, geometry, plans, configuration, label=label, case_id="a")
    without, no_label, properties_test = preprocess_case(image, geometry, plans, configuration, case_id="a")
    assert no_label is None
    np.testing.assert_array_equal(with_label, without)
    assert properties_test.bbox == properties_train.bbox
    assert properties_test.shape_after_resampling == properties_train.shape_after_resampling
    assert properties_test.class_locations == {}


def test_ct_normalisation_uses_plan_statistics() -> None:
    stats = IntensityStats(mean=50.0, std=20.0, median=50.0, min=-500.0, max=500.0,
                           percentile_00_5=0.0, percentile_99_5=100.0)
    configuration = make_configuration(target_spacing=(1.0, 1.0, 1.0), normalization=("ct",))
    plans = make_plans([configuration], channel_names={"0": "CT"}, intensity_stats={"0": stats})
    image = np.full((1, 4, 6, 6), 300.0, np.float32)
    image[0, :, :3] = -300.0
    geometry = Geometry((4, 6, 6), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    data, _, _ = preprocess_case(image, geometry, plans, configuration)
    assert np.allclose(data[0, :, :3], (0.0 - 50.0) / 20.0) and np.allclose(data[0, :, 3:], (100.0 - 50.0) / 20.0)


def test_wrong_channel_count_is_a_user_error() -> None:
    from autoseg.errors import DatasetError

    configuration = make_configuration()
    plans = make_plans([configuration], channel_names={"0": "T1", "1": "T2"})
    image, label, geometry = make_case(ANISOTROPIC, 0)
    with pytest.raises(DatasetError, match="case_x: has 1 channel.*expects 2"):
        preprocess_case(image, geometry, plans, configuration, label=label, case_id="case_x")
