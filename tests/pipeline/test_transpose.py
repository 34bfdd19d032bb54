"""A dataset stored with its thick axis last (x: sagittal-like stacks) through plan -> preprocess -> train ->
predict: the plan works coarse-axis-first, and every file written back has the input's own grid."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.contracts.plans import load_plans
from autoseg.dataset.synthetic import SyntheticSpec, generate
from autoseg.io import read_image, read_segmentation
from autoseg.preprocessing import load_case, preprocess_case, restore_segmentation
from autoseg.preprocessing.case import preprocess_label

DATASET = "Dataset981_ThickX"
# x is the thick axis (4 mm against 1 mm), and there are few voxels along it: clearly anisotropic
SPEC = SyntheticSpec(num_cases=5, num_test=1, shape=(28, 28, 8), spacing=(1.0, 1.0, 4.0), oblique=True, seed=7)


def _grid(path):
    image = sitk.ReadImage(str(path))
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _assert_same_grid(found, expected):
    assert found[0] == expected[0]  # size exactly
    for a, b in zip(found[1:], expected[1:]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _dice(a, b, value):
    x, y = a == value, b == value
    return 2.0 * np.logical_and(x, y).sum() / max(x.sum() + y.sum(), 1)


@pytest.mark.slow
def test_thick_x_dataset_end_to_end(tmp_path):
    from autoseg.inference import predict
    from autoseg.pipeline import plan_dataset
    from autoseg.training import train

    raw = generate(tmp_path / "raw" / DATASET, SPEC)
    plan_dataset(DATASET, root=tmp_path, configurations=["3d_fullres"], architectures=["unet"], num_workers=1,
                 show_summary=False)
    preprocessed = tmp_path / "preprocessed" / DATASET
    plans = load_plans(preprocessed / "plans.json")
    config = plans.configurations["3d_fullres"]
    assert plans.transpose_forward == [2, 0, 1]
    assert config.target_spacing[0] == max(config.target_spacing)  # the thick axis comes first...
    assert config.architecture.kernel_sizes[0][0] == 1  # ...and is not convolved across in the first stage
    stored, _, _ = load_case(preprocessed / "3d_fullres", "case_000")
    assert stored.shape[1] < min(stored.shape[2:])  # the preprocessed array is coarse-axis-first too

    # a label through preprocess_case / preprocess_label and back lands on its own grid, unchanged
    image, geometry = read_image(raw / "imagesTr" / "case_001_0000.nii.gz")
    label, _ = read_segmentation(raw / "labelsTr" / "case_001.nii.gz")
    _, stored_label, properties = preprocess_case(image, geometry, plans, config, label=label)
    np.testing.assert_array_equal(preprocess_label(label, properties, config), stored_label)
    restored = restore_segmentation(stored_label, properties, config)
    assert restored.shape == label.shape
    for value in (1, 2):
        assert _dice(restored, label, value) > 0.95

    # two iterations of training, then prediction of a new image (the fold's own validation prediction takes
    # the same restore path and is left out to keep this test short)
    train(DATASET, "3d_fullres", 0, root=tmp_path, epochs=1, iterations_per_epoch=2, device="cpu", num_workers=0,
          validation_iterations=1, validate=False)
    report = predict(raw / "imagesTs", tmp_path / "predictions", DATASET, "3d_fullres", folds=[0], root=tmp_path,
                     device="cpu", mirror=False, num_workers=1)
    assert report.ok
    prediction = tmp_path / "predictions" / "case_005.nii.gz"
    _assert_same_grid(_grid(prediction), _grid(raw / "imagesTs" / "case_005_0000.nii.gz"))
    predicted, predicted_geometry = read_segmentation(prediction)
    _, input_geometry = read_image(raw / "imagesTs" / "case_005_0000.nii.gz")
    assert predicted.shape == predicted_geometry.shape == input_geometry.shape
    assert predicted_geometry.mismatch(input_geometry) == []
    assert set(np.unique(predicted)) <= {0, 1, 2}
