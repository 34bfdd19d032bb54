"""Axis transposition in preprocessing: the pure functions, and a case stored coarse-axis-last going through
preprocess_case / preprocess_label and back through the restore functions onto its own grid."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.dataset.synthetic import SyntheticSpec, make_case
from autoseg.io import Geometry
from autoseg.preprocessing import preprocess_case, restore_probabilities, restore_segmentation
from autoseg.preprocessing.case import restore_segmentation_in_slabs
from autoseg.preprocessing.case import preprocess_label
from autoseg.preprocessing.store import CaseProperties
from autoseg.preprocessing.transpose import (
    case_order,
    transpose_array,
    transpose_geometry,
    transpose_values,
    untranspose_array,
)

from .helpers import dice, make_configuration, make_plans

COARSE_FIRST = SyntheticSpec(shape=(12, 36, 32), spacing=(3.0, 0.7, 0.7), oblique=True, seed=5)
FORWARD = [2, 0, 1]  # raw [Y, X, Z-thick] -> working [thick, Y, X]
# a rotation about an oblique axis, so every direction column differs from every other
DIRECTION = tuple(sitk.VersorTransform((0.3, -0.5, 0.8), 0.7).GetMatrix())


def test_transpose_array_and_back_keep_channels_in_front():
    array = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    moved = transpose_array(array, FORWARD)
    assert moved.shape == (2, 5, 3, 4)
    assert moved[1, 4, 2, 3] == array[1, 2, 3, 4]  # working index (z, a, b) is raw (a, b, z)
    back = untranspose_array(moved, FORWARD)
    assert back.flags.c_contiguous and np.array_equal(back, array)
    assert transpose_array(array[0], FORWARD).shape == (5, 3, 4)  # no leading axis
    assert transpose_array(array, [0, 1, 2]) is array and untranspose_array(array, None) is array
    assert transpose_values([0.7, 0.8, 5.0], FORWARD) == [5.0, 0.7, 0.8]
    with pytest.raises(ValueError):
        transpose_values([1.0, 2.0], FORWARD)


def test_case_order_never_transposes_other_dimensionalities():
    assert case_order(FORWARD, 3) == FORWARD
    assert case_order(FORWARD, 2) == [0, 1]
    assert case_order(None, 3) == [0, 1, 2]


def _sitk_image(shape, geometry: Geometry) -> sitk.Image:
    image = sitk.GetImageFromArray(np.zeros(shape, np.uint8))
    image.SetSpacing(tuple(reversed(geometry.spacing)))
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


@pytest.mark.parametrize("order", [[2, 0, 1], [1, 0, 2], [0, 2, 1], [1, 2, 0]])
def test_transposed_geometry_keeps_every_voxel_in_place(order):
    geometry = Geometry((4, 5, 6), (0.7, 0.8, 5.0), (10.0, -20.0, 3.0), DIRECTION)
    moved = transpose_geometry(geometry, order)
    assert moved.shape == tuple(geometry.shape[a] for a in order)
    assert moved.spacing == tuple(geometry.spacing[a] for a in order)
    assert moved.origin == geometry.origin
    assert moved.array_axes == "".join("zyx"[a] for a in order)
    raw, working = _sitk_image(geometry.shape, geometry), _sitk_image(moved.shape, moved)
    rng = np.random.default_rng(0)
    for _ in range(10):
        raw_index = [int(rng.integers(n)) for n in geometry.shape]
        working_index = [raw_index[a] for a in order]
        # SimpleITK indexes x first: the array index reversed
        expected = raw.TransformIndexToPhysicalPoint(raw_index[::-1])
        found = working.TransformIndexToPhysicalPoint(working_index[::-1])
        np.testing.assert_allclose(found, expected, atol=1e-9)


def _coarse_last_case(index: int):
    """A case with the thick axis last: the synthetic coarse-first case with its axes moved, same voxels."""
    image, label, geometry = make_case(COARSE_FIRST, index)
    raw_image = np.ascontiguousarray(image.transpose(0, 2, 3, 1))
    raw_label = np.ascontiguousarray(label.transpose(1, 2, 0))
    spacing = (geometry.spacing[1], geometry.spacing[2], geometry.spacing[0])
    raw_geometry = Geometry(raw_label.shape, spacing, (4.0, -7.5, 12.0), DIRECTION)
    return (image, label, geometry), (raw_image, raw_label, raw_geometry)


@pytest.mark.parametrize("index", range(2))
def test_coarse_last_case_preprocesses_like_coarse_first_and_restores_onto_its_grid(index):
    configuration = make_configuration(target_spacing=(1.5, 0.5, 0.5))
    identity = make_plans([configuration])
    transposed = replace(identity, transpose_forward=FORWARD, transpose_backward=None)
    (image, label, geometry), (raw_image, raw_label, raw_geometry) = _coarse_last_case(index)

    expected_data, expected_label, expected_props = preprocess_case(image, geometry, identity, configuration, label)
    data, stored, properties = preprocess_case(raw_image, raw_geometry, transposed, configuration, raw_label)
    # the same voxels in the working order: preprocessing cannot tell the two apart
    np.testing.assert_array_equal(data, expected_data)
    np.testing.assert_array_equal(stored, expected_label)
    assert properties.shape_after_resampling == expected_props.shape_after_resampling
    assert properties.spacing_after_resampling == pytest.approx([1.5, 0.5, 0.5])
    assert properties.class_locations == expected_props.class_locations
    assert properties.transpose_forward == FORWARD
    assert properties.geometry == raw_geometry  # restoring needs the input's own grid

    # a label on the raw grid maps to exactly what preprocess_case stored (cascade inputs take this path)
    np.testing.assert_array_equal(preprocess_label(raw_label, properties, configuration), stored)

    restored = restore_segmentation(stored, properties, configuration)
    assert restored.shape == raw_geometry.shape and restored.dtype == stored.dtype
    for value in (1, 2):
        assert dice(restored, raw_label, value) > 0.98
    one_hot = np.stack([(stored[0] == k) for k in range(3)]).astype(np.float32)
    probabilities = restore_probabilities(one_hot, properties, configuration)
    assert probabilities.shape == (3, *raw_geometry.shape) and probabilities.flags.c_contiguous
    np.testing.assert_array_equal(probabilities.argmax(0), restored)

    # the bounded-memory restore of `autoseg predict` lands on the same raw grid, probabilities included
    log_probabilities = np.log(np.clip(one_hot * 0.98 + 0.01, 1e-6, None))
    written = np.full((3, *raw_geometry.shape), np.nan, dtype=np.float32)
    slabbed = restore_segmentation_in_slabs(log_probabilities, properties, configuration, written, slab_bytes=4096)
    assert slabbed.shape == raw_geometry.shape
    np.testing.assert_array_equal(slabbed, restored)
    assert not np.isnan(written).any()
    np.testing.assert_array_equal(written.argmax(0), restored)


def test_properties_round_trip_and_old_properties_restore_untransposed():
    configuration = make_configuration(target_spacing=(3.0, 0.7, 0.7))
    plans = replace(make_plans([configuration]), transpose_forward=FORWARD, transpose_backward=None)
    _, (raw_image, raw_label, raw_geometry) = _coarse_last_case(0)
    _, stored, properties = preprocess_case(raw_image, raw_geometry, plans, configuration, raw_label)
    assert CaseProperties.from_json(properties.to_json()) == properties

    # properties written before the field existed: identity, i.e. a case preprocessed without transposing
    raw_order = make_configuration(target_spacing=raw_geometry.spacing)
    identity_plans = make_plans([raw_order])
    _, stored, properties = preprocess_case(raw_image, raw_geometry, identity_plans, raw_order, raw_label)
    data = properties.to_json()
    assert data.pop("transpose_forward") == [0, 1, 2]
    old = CaseProperties.from_json(data)
    assert old.transpose_forward is None
    np.testing.assert_array_equal(restore_segmentation(stored, old, raw_order), raw_label)


def test_two_d_images_are_never_transposed():
    configuration = make_configuration(name="2d", dims=2, target_spacing=(0.5, 0.5))
    plans = replace(make_plans([configuration]), transpose_forward=FORWARD, transpose_backward=None)
    spec = SyntheticSpec(dims=2, shape=(40, 32), spacing=(1.0, 0.5), seed=2)
    image, label, geometry = make_case(spec, 0)
    _, stored, properties = preprocess_case(image, geometry, plans, configuration, label)
    assert properties.transpose_forward == [0, 1]
    restored = restore_segmentation(stored, properties, configuration)
    assert restored.shape == geometry.shape and dice(restored, label, 1) > 0.95
