"""Cascade stage (3d_cascade_fullres): previous-stage inputs on the preprocessed grid, their augmentation,
the sampler and trainer wiring, and the whole chain lowres -> cascade -> prediction on tiny data."""
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from autoseg.contracts.plans import Plans, Resampling, load_plans, save_plans
from autoseg.errors import ConfigurationError, DatasetError
from autoseg.io import Geometry, read_segmentation, write_segmentation
from autoseg.paths import resolve_dataset
from autoseg.preprocessing.case import preprocess_case, preprocess_label
from autoseg.preprocessing.store import load_case
from autoseg.training.augmentation import PreviousStageToData, RandomBinaryOperators, RemoveRandomComponent
from autoseg.training.cascade import load_previous_stage, prepare_previous_stage, previous_stage_folder
from autoseg.training.data import PatchSampler

from .tiny_data import DATASET, _configuration, build_tiny_dataset

FAST = dict(num_workers=0, device="cpu", validation_iterations=1)


def _ball(radius: int, dims: int) -> np.ndarray:
    grid = np.indices((2 * radius + 1,) * dims) - radius
    return (grid**2).sum(0) <= radius**2


def test_preprocess_label_gives_the_grid_preprocess_case_gives_the_label():
    rng = np.random.default_rng(0)
    label = np.zeros((12, 30, 26), dtype=np.uint8)
    label[3:9, 5:20, 4:18] = 1
    label[5:7, 8:12, 6:10] = 2
    image = rng.normal(size=(1, 12, 30, 26)).astype(np.float32)
    image[:, :, :2] = 0  # a zero border: the crop box is not the whole image
    geometry = Geometry(spacing=(3.0, 0.8, 0.9), origin=(1.0, 2.0, 3.0), direction=tuple(np.eye(3).ravel()),
                        shape=(12, 30, 26))
    config = dataclasses.replace(_configuration("3d_fullres", "3d_fullres", 3, (8, 16, 16), (1.5, 1.0, 1.0)),
                                 resampling=Resampling())
    plans = Plans(dataset_name="Dataset1_X", channel_names={"0": "MRI"}, labels={"bg": 0, "a": 1, "b": 2},
                  file_ending=".nii.gz", configurations={"3d_fullres": config}, default_configurations=[],
                  intensity_stats={}, median_spacing=[3.0, 0.8, 0.9], median_shape=[12, 30, 26])
    _, stored, properties = preprocess_case(image, geometry, plans, config, label=label, case_id="c")
    assert stored.shape[1:] != label.shape  # resampled and cropped, so the test means something
    # as training does it: the properties as read back from the store's JSON, no image
    from autoseg.preprocessing.store import CaseProperties

    stored_properties = CaseProperties.from_json(json.loads(json.dumps(properties.to_json())))
    converted = preprocess_label(label, stored_properties, config)
    assert converted.dtype == np.int8 and np.array_equal(converted, stored)
    with pytest.raises(DatasetError, match="must share one grid"):
        preprocess_label(label[:, :10], properties, config)


@pytest.mark.parametrize("dims", [2, 3])
def test_binary_operators_match_morphology_with_a_ball(dims):
    rng = np.random.default_rng(dims)
    shape = (40, 44) if dims == 2 else (24, 26, 28)
    mask = ndimage.binary_opening(rng.random(shape) > 0.55, iterations=1)
    # keep objects off the border: the distance transform treats the patch edge as unknown, not background
    pad = [(6, 6)] * dims
    mask = np.pad(mask, pad)
    transform = RandomBinaryOperators([0])
    ball = _ball(3, dims)
    assert np.array_equal(transform.apply(mask, "dilation", 3), ndimage.binary_dilation(mask, ball))
    assert np.array_equal(transform.apply(mask, "erosion", 3), ndimage.binary_erosion(mask, ball, border_value=1))
    opened = ndimage.binary_dilation(ndimage.binary_erosion(mask, ball, border_value=1), ball)
    assert np.array_equal(transform.apply(mask, "opening", 3), opened)
    empty = np.zeros(shape, dtype=bool)
    assert not transform.apply(empty, "dilation", 2).any()


def test_binary_operators_keep_the_channels_one_hot():
    data = np.zeros((1, 3, 20, 20), dtype=np.float32)  # image channel + 2 previous-stage channels
    data[0, 1, 4:10, 4:10] = 1
    data[0, 2, 10:16, 4:10] = 1
    transform = RandomBinaryOperators([-2, -1], p_per_sample=1.0, radius=(3, 3))
    np.random.seed(1)
    transform.OPERATIONS = ("dilation",)
    out = transform(data=data.copy())["data"]
    assert (out[0, 1:] > 0).sum(0).max() == 1  # no voxel in two classes
    assert out[0, 1:].sum() > data[0, 1:].sum()  # something grew
    assert np.array_equal(out[0, 0], data[0, 0])  # the image is untouched


def test_remove_random_component_removes_one_small_object_only():
    data = np.zeros((1, 2, 30, 30), dtype=np.float32)
    data[0, 1, 2:5, 2:5] = 1  # 9 voxels
    data[0, 1, 20:23, 20:23] = 1  # 9 voxels
    data[0, 1, 8:18, 0:30] = 1  # 300 voxels = 33 % of the patch: never removed
    transform = RemoveRandomComponent([-1], p_per_sample=1.0, max_fraction=0.15)
    np.random.seed(0)
    out = transform(data=data.copy())["data"][0, 1]
    assert out.sum() == data[0, 1].sum() - 9
    assert out[8:18].all()
    assert out[2:5, 2:5].all() != out[20:23, 20:23].all()  # exactly one of the two small ones went


def test_previous_stage_to_data_appends_foreground_one_hot():
    seg = np.zeros((2, 2, 4, 4), dtype=np.float32)
    seg[:, 0, 0, 0] = 1  # the label stays the target
    seg[0, 1, 1, 1], seg[1, 1, 2, 2] = 2, 1
    data = np.ones((2, 1, 4, 4), dtype=np.float32)
    out = PreviousStageToData(3)(data=data, seg=seg)
    assert out["data"].shape == (2, 3, 4, 4) and out["seg"].shape == (2, 1, 4, 4)
    assert out["data"][0, 2, 1, 1] == 1 and out["data"][0, 1].sum() == 0
    assert out["data"][1, 1, 2, 2] == 1 and out["data"][1, 2].sum() == 0
    assert np.array_equal(out["seg"][:, 0], seg[:, 0])


def _cascade_dataset(root: Path) -> tuple[Path, Plans]:
    build_tiny_dataset(root, dims=3, num_cases=5)
    plans_file = root / "preprocessed" / DATASET / "plans.json"
    plans = load_plans(plans_file)
    base = plans.configurations["3d_fullres"]
    plans.configurations["3d_lowres"] = dataclasses.replace(base, name="3d_lowres")
    plans.configurations["3d_cascade_fullres"] = dataclasses.replace(base, name="3d_cascade_fullres",
                                                                     previous_stage="3d_lowres")
    save_plans(plans, plans_file)
    return plans_file, plans


def _fake_lowres_predictions(root: Path, folds=range(5)) -> None:
    """Write each case's label, shifted by one voxel, as 3d_lowres's cross-validation prediction."""
    splits = __import__("json").loads((root / "preprocessed" / DATASET / "splits.json").read_text())
    for fold in folds:
        for case in splits[fold]["val"]:
            label, geometry = read_segmentation(root / "raw" / DATASET / "labelsTr" / f"{case}.nii.gz")
            target = root / "results" / DATASET / "3d_lowres__unet" / f"fold_{fold}" / "validation" / f"{case}.nii.gz"
            write_segmentation(np.roll(label, 1, axis=-1), geometry, target)


def test_cascade_inputs_need_every_lowres_fold_and_follow_retraining(tmp_path):
    from autoseg.contracts.splits import load_splits
    from autoseg.training import train

    _, plans = _cascade_dataset(tmp_path)
    _fake_lowres_predictions(tmp_path, folds=[0, 2, 3])
    with pytest.raises(ConfigurationError, match=r"fold\(s\) 1, 4 .*autoseg train Dataset990_Tiny 3d_lowres 1 "
                                                 r"--root \S+; autoseg train Dataset990_Tiny 3d_lowres 4 --root"):
        train(DATASET, "3d_cascade_fullres", 0, root=tmp_path, epochs=1, iterations_per_epoch=1, **FAST)
    assert not (tmp_path / "results" / DATASET / "3d_cascade_fullres__unet").exists()  # nothing half-made

    _fake_lowres_predictions(tmp_path)
    location = resolve_dataset(DATASET, tmp_path)
    config = plans.configurations["3d_cascade_fullres"]
    store = location.preprocessed / "3d_fullres"
    cases = [f"case_{i:03d}" for i in range(5)]
    splits = load_splits(location.preprocessed)
    folder = prepare_previous_stage(location, plans, config, store, splits, cases)
    assert folder == previous_stage_folder(location, plans, config)
    converted = load_previous_stage(folder, "case_001")
    label = load_case(store, "case_001", mmap=False)[1]
    assert converted.shape == label.shape and np.array_equal(converted, np.roll(label, 1, axis=-1))
    # a retrained lowres fold (newer prediction) is converted again; an unchanged one is not touched
    before = (folder / "case_002.b2nd").stat().st_mtime_ns  # written in the store's default format
    source = location.results / "3d_lowres__unet" / "fold_1" / "validation" / "case_001.nii.gz"
    seg, geometry = read_segmentation(source)
    write_segmentation(np.zeros_like(seg), geometry, source)
    os.utime(source, ns=(source.stat().st_atime_ns, (folder / "case_001.b2nd").stat().st_mtime_ns + 10**9))
    prepare_previous_stage(location, plans, config, store, splits, cases)
    assert not load_previous_stage(folder, "case_001").any()
    assert (folder / "case_002.b2nd").stat().st_mtime_ns == before


def test_sampler_reads_the_previous_stage_beside_the_label(tmp_path):
    from autoseg.contracts.splits import load_splits

    _, plans = _cascade_dataset(tmp_path)
    _fake_lowres_predictions(tmp_path)
    location = resolve_dataset(DATASET, tmp_path)
    store = location.preprocessed / "3d_fullres"
    folder = prepare_previous_stage(location, plans, plans.configurations["3d_cascade_fullres"], store,
                                    load_splits(location.preprocessed), [f"case_{i:03d}" for i in range(5)])
    sampler = PatchSampler(store, ["case_000", "case_003"], (16, 32, 32), 3, 3, previous_stage=folder)
    batch = sampler.sample_batch(np.random.default_rng(0))
    assert batch["seg"].shape == (3, 2, 16, 32, 32)
    # the tiny cases are exactly one patch: channel 1 is the shifted label, channel 0 the label
    for seg in batch["seg"]:
        assert np.array_equal(seg[1], np.roll(seg[0], 1, axis=-1))


@pytest.mark.slow
def test_lowres_then_cascade_trains_validates_and_predicts(tmp_path):
    import torch

    from autoseg.inference import Predictor
    from autoseg.training import train
    from autoseg.contracts.checkpoint import load_checkpoint

    _cascade_dataset(tmp_path)
    for fold in range(5):
        train(DATASET, "3d_lowres", fold, root=tmp_path, epochs=1, iterations_per_epoch=2, **FAST)
    folder = train(DATASET, "3d_cascade_fullres", 0, root=tmp_path, epochs=2, iterations_per_epoch=3, **FAST)
    checkpoint = load_checkpoint(folder / "checkpoint_final.pt")
    assert checkpoint["metadata"]["in_channels"] == 3  # image + 2 foreground classes of the previous stage
    first = next(v for k, v in checkpoint["network"].items() if v.ndim == 5)
    assert first.shape[1] == 3
    assert (folder / "validation" / "case_000.nii.gz").is_file()
    assert (folder / "validation" / "summary.json").is_file()
    # prediction runs the low-resolution stage first, then the cascade, on a raw image
    predictor = Predictor.from_folder(DATASET, "3d_cascade_fullres", folds=[0], root=tmp_path, device="cpu")
    assert predictor.previous_stage is not None and len(predictor.previous_stage.networks) == 5
    segmentation, probabilities, geometry = predictor.predict_files(
        tmp_path / "raw" / DATASET / "imagesTr" / "case_001_0000.nii.gz")
    _, reference = read_segmentation(tmp_path / "raw" / DATASET / "labelsTr" / "case_001.nii.gz")
    assert segmentation.shape == tuple(reference.shape) and probabilities.shape[0] == 3
    assert torch.isfinite(torch.from_numpy(probabilities)).all()


def test_binary_operators_on_the_object_box_equal_the_whole_patch():
    from scipy.ndimage import distance_transform_edt

    rng = np.random.default_rng(7)
    transform = RandomBinaryOperators([0])
    for trial in range(6):
        mask = np.zeros((20, 24, 22), dtype=bool)
        start = rng.integers(0, 12, size=3)  # some objects touch the patch edge
        size = rng.integers(3, 10, size=3)
        mask[tuple(slice(s, s + n) for s, n in zip(start, size))] = rng.random(tuple(size)) > 0.3
        radius = int(rng.integers(1, 5))
        assert np.array_equal(transform.apply(mask, "dilation", radius), distance_transform_edt(~mask) <= radius)
        assert np.array_equal(transform.apply(mask, "erosion", radius), distance_transform_edt(mask) > radius)
