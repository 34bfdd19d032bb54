"""CT phantoms: shapes and spacing on disk, every class present, HU per tissue, determinism, verify passes."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from autoseg.dataset.phantom_ct import (
    HU_RANGES,
    KIND_TISSUE,
    PhantomSpec,
    case_grid,
    dataset_labels,
    generate_ct_phantoms,
    make_ct_phantom,
    make_layout,
    missing_classes,
    render_case,
    render_slab,
    structure_kinds,
)
from autoseg.dataset.verify import verify_dataset
from autoseg.io import read_image, read_segmentation

# 32 x 48 x 48 voxels of about 8 mm in-plane and 17 mm along Z (scale 0.094 of 340 x 512 x 512)
TINY = PhantomSpec(num_cases=2, num_classes=12, slices=(340, 340), scale=0.094, slice_spacing_mm=(1.0, 2.0), seed=5)


def test_class_kinds_cover_every_kind_and_cap_the_large_ones() -> None:
    assert set(structure_kinds(12)) == set(KIND_TISSUE)
    kinds = structure_kinds(40)
    assert kinds.count("large_organ") == 4 and kinds.count("large_vessel") == 2
    assert kinds.count("spine") == 1 and kinds.count("ribs") == 1
    labels = dataset_labels(40)
    assert len(labels) == 41 and labels["background"] == 0 and sorted(labels.values()) == list(range(41))
    with pytest.raises(ValueError, match="1..255"):
        structure_kinds(256)


def test_scale_keeps_the_physical_extent() -> None:
    full = replace(TINY, scale=1.0)
    shape_full, spacing_full = case_grid(full, np.random.default_rng([5, 0]))
    shape, spacing = case_grid(TINY, np.random.default_rng([5, 0]))
    assert shape_full == (340, 512, 512) and shape == (32, 48, 48)
    assert 0.7 <= spacing_full[1] == spacing_full[2] <= 0.9 and 1.0 <= spacing_full[0] <= 2.0
    np.testing.assert_allclose(np.multiply(shape, spacing), np.multiply(shape_full, spacing_full))


def test_written_dataset_has_its_shape_spacing_labels_and_verifies(tmp_path: Path) -> None:
    out = generate_ct_phantoms(tmp_path / "Dataset300_Phantom", TINY)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 2
    assert meta["labels"] == dataset_labels(12) and meta["file_ending"] == ".nii.gz"
    for index in range(2):
        image, geometry = read_image(out / "imagesTr" / f"case_{index:03d}_0000.nii.gz")
        label, label_geometry = read_segmentation(out / "labelsTr" / f"case_{index:03d}.nii.gz")
        expected_image, expected_label, expected_geometry = make_ct_phantom(TINY, index)
        assert image.shape == (1, 32, 48, 48) and label.shape == (32, 48, 48)
        np.testing.assert_allclose(geometry.spacing, expected_geometry.spacing, rtol=1e-6)
        np.testing.assert_allclose(label_geometry.spacing, expected_geometry.spacing, rtol=1e-6)
        np.testing.assert_array_equal(image[0], expected_image)
        np.testing.assert_array_equal(label, expected_label)
    report = verify_dataset(out, num_workers=1)
    assert report.ok, report.format()
    assert not report.warnings, report.format()  # no "unused label": every class is in the training cases


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_class_present_at_tiny_scale(seed: int) -> None:
    spec = replace(TINY, seed=seed, num_classes=32)
    _, label, _ = make_ct_phantom(spec, 0)
    assert missing_classes(label, 32) == []


def test_thin_structures_vanish_at_tiny_scale_without_widening() -> None:
    """The documented limit: at 8 mm voxels a 2-6 mm vessel or a 6 mm node may miss every voxel centre.
    (seed 0, case 0 loses vessel_1; seed 1 loses small_organ_1: found by running these seeds.)"""
    kinds = structure_kinds(12)
    lost = []
    for seed in (0, 1):
        spec = replace(TINY, seed=seed, keep_thin_structures=False)
        _, label, _ = make_ct_phantom(spec, 0)
        lost += [kinds[k - 1] for k in missing_classes(label, 12)]
    assert lost and set(lost) <= {"vessel", "small_organ"}


def test_hu_of_each_tissue_without_noise() -> None:
    spec = replace(TINY, noise_hu=0.0, num_classes=20)
    layout = make_layout(spec, 0)
    image, label = render_case(layout)
    by_label = {s.label: s for s in layout.structures}
    for value in range(1, 21):
        low, high = HU_RANGES[KIND_TISSUE[by_label[value].kind]]
        values = image[label == value]
        assert values.size and low <= values.min() and values.max() <= high, (by_label[value].kind, values.min(), values.max())
    background = image[label == 0]
    air = background == -1000
    fat = (background >= HU_RANGES["fat"][0]) & (background <= HU_RANGES["fat"][1])
    soft = (background >= HU_RANGES["soft_tissue"][0]) & (background <= HU_RANGES["muscle"][1])
    assert np.all(air | fat | soft)
    # layers from the image border inwards along the middle row: air, fat, muscle, then cavity soft tissue
    row = image[16, 24, :24]
    tissues = [int(v) for v in dict.fromkeys(row.tolist())]
    assert tissues[:4] == [-1000, round(layout.body.fat_hu), round(layout.body.muscle_hu), round(layout.body.soft_tissue_hu)]


def test_noise_keeps_class_means_in_range() -> None:
    layout = make_layout(TINY, 0)
    image, label = render_case(layout)
    outside = image[label == 0][image[label == 0] < -500]
    assert abs(outside.mean() + 1000) < 5 and 8 < outside.std() < 16  # noise_hu 12 around air (clipped at -1024)
    for structure in layout.structures:
        low, high = HU_RANGES[KIND_TISSUE[structure.kind]]
        mean = image[label == structure.label].mean()
        assert low - 12 <= mean <= high + 12


def test_deterministic_and_case_independent() -> None:
    image_a, label_a, _ = make_ct_phantom(TINY, 1)
    image_b, label_b, _ = make_ct_phantom(replace(TINY, num_cases=7), 1)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(label_a, label_b)
    image_c, _, _ = make_ct_phantom(replace(TINY, seed=6), 1)
    assert not np.array_equal(image_a, image_c)
    assert image_a.dtype == np.int16 and label_a.dtype == np.uint8


def test_slabs_join_without_seams() -> None:
    """Rendering by slabs is a memory device only: any slab boundaries give the same noise-free volume."""
    layout = make_layout(replace(TINY, noise_hu=0.0, scale=0.2, num_classes=32), 0)
    image, label = render_case(layout)
    assert layout.shape[0] > 40
    part_image, part_label = render_slab(layout, 7, 40)
    np.testing.assert_array_equal(part_image, image[7:40])
    np.testing.assert_array_equal(part_label, label[7:40])


def test_missing_classes_counts_every_slab() -> None:
    label = np.zeros((70, 4, 4), np.uint8)
    label[0, 0, 0] = 1
    label[69, 3, 3] = 3  # only in the last, partial slab
    assert missing_classes(label, 4) == [2, 4]
    assert missing_classes(np.zeros((3, 2, 2), np.uint8), 2) == [1, 2]
