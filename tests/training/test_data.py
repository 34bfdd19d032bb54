import random

import numpy as np
import pytest

from autoseg.training.augmentation import augmentation_settings, sample_size_for, training_transforms
from autoseg.training.data import PatchSampler, downsample_label, enlarged_patch_size, forced_foreground
from autoseg.training.loader import BatchLoader

from .tiny_data import DATASET


def test_enlarged_patch_size_by_hand():
    # 2D, rotation up to 45 degrees: extent = (a + b) / sqrt(2), then divided by the 0.85 scale
    assert enlarged_patch_size((20, 20), (np.pi / 4,), min_scale=1.0) == (29, 29)
    assert enlarged_patch_size((20, 40), (0.0,), min_scale=0.5) == (40, 80)
    # 3D with no rotation is only scaled
    assert enlarged_patch_size((8, 16, 16), (0.0, 0.0, 0.0), min_scale=0.8) == (10, 20, 20)
    # dummy 2D keeps the first axis
    settings = augmentation_settings((4, 64, 64))
    assert settings.dummy_2d and sample_size_for((4, 64, 64), settings)[0] == 4
    assert not augmentation_settings((16, 32, 32)).dummy_2d


def test_downsample_label_nearest():
    label = np.arange(16).reshape(1, 1, 4, 4)
    half = downsample_label(label, (0.5, 0.5))
    assert half.shape == (1, 1, 2, 2)
    assert half[0, 0].tolist() == [[5, 7], [13, 15]]  # centre of each 2x2 block rounds to its lower-right voxel
    assert downsample_label(label, (1.0, 0.5)).shape == (1, 1, 4, 2)


def test_forced_foreground_rule():
    assert [forced_foreground(i, 2) for i in range(2)] == [False, True]
    assert sum(forced_foreground(i, 12) for i in range(12)) == 4


def test_sampler_reads_region_and_oversamples_foreground(tiny3d):
    folder = tiny3d / "preprocessed" / DATASET / "3d_fullres"
    sampler = PatchSampler(folder, ["case_000", "case_001"], (12, 20, 20), batch_size=3, dims=3,
                           oversample_foreground=1.0)
    rng = np.random.default_rng(0)
    batch = sampler.sample_batch(rng)
    assert batch["data"].shape == (3, 1, 12, 20, 20) and batch["seg"].shape == (3, 1, 12, 20, 20)
    # every patch is centred on foreground: its centre voxel region contains a label > 0
    for seg in batch["seg"]:
        assert (seg[0, 4:8, 8:12, 8:12] > 0).any()
    # a patch equals the stored array at the same place (read via memmap, no shift)
    data, label = sampler.arrays("case_000")
    image, patch_label, _ = sampler.sample_patch(np.random.default_rng(5), force_foreground=False)
    big = PatchSampler(folder, ["case_000"], (40, 60, 60), 1, 3)  # larger than the image: zero padded
    padded, padded_label, _ = big.sample_patch(np.random.default_rng(1), False)
    z, y, x = label.shape[1:]
    assert padded.shape == (1, 40, 60, 60)
    nz = np.argwhere(padded_label[0] > 0)
    assert padded_label.sum() == np.maximum(np.asarray(label), 0).sum()  # the whole image is inside
    assert (padded[0] != 0).sum() == (np.asarray(data)[0] != 0).sum()
    assert nz.size


def test_sampler_2d_slices_from_4d_store(tiny3d):
    folder = tiny3d / "preprocessed" / DATASET / "3d_fullres"
    sampler = PatchSampler(folder, ["case_002"], (24, 24), batch_size=2, dims=2)
    batch = sampler.sample_batch(np.random.default_rng(0))
    assert batch["data"].shape == (2, 1, 24, 24)


@pytest.mark.parametrize("patch", [(24, 24), (12, 16, 16), (4, 24, 24)])
def test_augmentation_keeps_image_and_label_aligned(patch):
    rng = np.random.default_rng(0)
    np.random.seed(0)
    dims = len(patch)
    settings = augmentation_settings(patch)
    size = sample_size_for(patch, settings)
    # the image *is* the label (as float): after any spatial transform they must still coincide
    seg = np.zeros((2, 1, *size), np.float32)
    centre = tuple(slice(s // 2 - max(1, s // 5), s // 2 + max(1, s // 5)) for s in size)
    seg[(slice(None), 0) + centre] = 1
    seg[(0, 0) + tuple(slice(s // 2, s // 2 + 2) for s in size)] = 2
    transforms = training_transforms(patch, settings, [(1.0,) * dims, (0.5,) * dims], intensity=False,
                                     spatial_probability=1.0)
    out = transforms(data=seg.copy() * 10.0, seg=seg.copy())
    assert out["data"].shape == (2, 1, *patch)
    target = out["target"][0]
    assert target.shape == (2, 1, *patch) and out["target"][1].shape == (2, 1, *[p // 2 for p in patch])
    from_image = np.clip(np.rint(out["data"] / 10.0), 0, 2)
    agreement = (from_image == target).mean()
    assert agreement > 0.97, agreement
    assert (target == 1).sum() > 0


def test_loader_batch_depends_only_on_seed_and_iteration(tiny2d):
    """Issue 18.9: with worker processes each worker had its own random stream, so which batch came k-th
    depended on the worker count and a resume replayed other batches; now batch k is a function of (seed, k)."""
    folder = tiny2d / "preprocessed" / DATASET / "2d"
    settings = augmentation_settings((32, 32))
    sampler = PatchSampler(folder, ["case_000", "case_001", "case_002"], sample_size_for((32, 32), settings), 2, 2)
    transforms = training_transforms((32, 32), settings, [(1.0, 1.0), (0.5, 0.5)])

    def batches(num_workers, start, count):
        np.random.seed(99)  # whatever the global state was, the batch must not depend on it
        random.seed(99)
        loader = BatchLoader(sampler, transforms, num_workers=num_workers, seed=(7, 0), start_iteration=start)
        try:
            return [next(loader) for _ in range(count)]
        finally:
            loader.close()

    in_process = batches(0, 0, 5)
    assert in_process[0]["data"].shape == (2, 1, 32, 32) and in_process[0]["target"][1].shape == (2, 1, 16, 16)
    assert not np.array_equal(in_process[0]["data"].numpy(), in_process[1]["data"].numpy())
    # two workers; a loader started at iteration 3 (a resume), in-process and with two workers
    for other in (batches(2, 0, 5), [None] * 3 + batches(0, 3, 2), [None] * 3 + batches(2, 3, 2)):
        for k in range(5):
            if other[k] is None:
                continue
            assert np.array_equal(other[k]["data"].numpy(), in_process[k]["data"].numpy()), k
            for a, b in zip(other[k]["target"], in_process[k]["target"]):
                assert np.array_equal(a.numpy(), b.numpy()), k
            assert other[k]["keys"] == in_process[k]["keys"]


def test_rotation_matrix_by_hand():
    from autoseg.training.augmentation import rotation_matrix

    quarter = rotation_matrix([np.pi / 2])
    assert np.allclose(quarter @ [1, 0], [0, 1])
    m = rotation_matrix([0.3, -0.7, 1.1])
    assert np.allclose(m @ m.T, np.eye(3)) and np.isclose(np.linalg.det(m), 1.0)
    assert np.allclose(rotation_matrix([0.0, 0.0, np.pi / 2]) @ [1, 0, 0], [0, 1, 0])  # about axis 2: 0 -> 1


def test_rotate_scale_crop_geometry():
    from autoseg.training.augmentation import RotateScaleCrop

    rng = np.random.default_rng(0)
    data = rng.normal(size=(1, 2, 9, 9)).astype(np.float32)
    seg = rng.integers(0, 3, size=(1, 1, 9, 9)).astype(np.float32)
    transform = RotateScaleCrop((5, 5), (np.pi,), p_rotation=0.0, scale=(0.7, 1.4), p_scale=0.0)
    out = transform(data=data.copy(), seg=seg.copy())  # neither rotated nor scaled: centre crop
    assert np.array_equal(out["data"], data[:, :, 2:7, 2:7]) and np.array_equal(out["seg"], seg[:, :, 2:7, 2:7])
    # a quarter turn about the centre: the grid path reproduces np.rot90 of the centre crop exactly
    transform._draw_matrix = lambda: np.array([[0.0, -1.0], [1.0, 0.0]])
    out = transform(data=data.copy(), seg=seg.copy())
    expected = np.rot90(data[:, :, 2:7, 2:7], k=1, axes=(2, 3))
    turned = [np.allclose(out["data"], np.rot90(data[:, :, 2:7, 2:7], k=k, axes=(2, 3)), atol=1e-5) for k in (1, 3)]
    assert any(turned), (out["data"][0, 0], expected[0, 0])
    seg_turned = [np.array_equal(out["seg"], np.rot90(seg[:, :, 2:7, 2:7], k=k, axes=(2, 3))) for k in (1, 3)]
    assert seg_turned == turned  # labels turn with the image
    # zooming out (factor 3) reaches past the sample: the image there is 0 and the label background
    seg_fg = seg + 1  # no background inside the sample, so a 0 can only come from outside it
    transform._draw_matrix = lambda: np.eye(2) * 3.0
    out = transform(data=data.copy(), seg=seg_fg.copy())
    assert out["seg"][0, 0, 0, 0] == 0 and out["data"][0, 0, 0, 0] == 0
    assert set(np.unique(out["seg"])) == {0.0, 1.0, 2.0, 3.0}
    seg = seg_fg
    assert np.array_equal(out["seg"][0, 0, 2, 2], seg[0, 0, 4, 4])  # the centre stays put


def test_rotate_scale_crop_dummy_2d_keeps_slices_apart():
    from autoseg.training.augmentation import RotateScaleCrop

    # dummy 2D folds the first axis into channels: each slice's labels must be interpolated on their own
    seg = np.zeros((1, 3, 11, 11), dtype=np.float32)
    seg[0, 1] = 2
    transform = RotateScaleCrop((7, 7), (np.pi,), p_rotation=1.0, scale=(0.7, 1.4), p_scale=0.0)
    np.random.seed(3)
    out = transform(data=seg.copy(), seg=seg.copy())
    assert set(np.unique(out["seg"][0, 0])) == {0.0} and set(np.unique(out["seg"][0, 2])) == {0.0}
    assert (out["seg"][0, 1, 3, 3] == 2) and set(np.unique(out["seg"][0, 1])) <= {0.0, 2.0}


def test_simulate_low_resolution_blurs_only_chosen_channels_and_axes():
    from autoseg.training.augmentation import SimulateLowResolution

    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 2, 6, 16, 16)).astype(np.float32)
    never = SimulateLowResolution((0.5, 0.5), p_per_sample=0.0, p_per_channel=1.0)
    assert np.array_equal(never(data=data.copy())["data"], data)
    always = SimulateLowResolution((0.5, 0.5), p_per_sample=1.0, p_per_channel=1.0, ignore_axes=(0,))
    out = always(data=data.copy())["data"]
    assert out.shape == data.shape and out.dtype == np.float32
    # each slice along the ignored axis 0 is smoothed in-plane only: a constant slice stays exactly constant
    steps = np.zeros((1, 1, 4, 16, 16), dtype=np.float32)
    steps[0, 0] = np.arange(4, dtype=np.float32)[:, None, None]
    assert np.allclose(always(data=steps.copy())["data"], steps)
    # the detail is gone: neighbouring voxels become more alike than in the white-noise input
    def roughness(a):
        return np.abs(np.diff(a, axis=-1)).mean()
    assert roughness(out) < 0.8 * roughness(data)


def test_rotate_scale_crop_axis_order_on_a_non_square_sample():
    from autoseg.training.augmentation import RotateScaleCrop

    data = np.arange(7 * 11, dtype=np.float32).reshape(1, 1, 7, 11)
    transform = RotateScaleCrop((5, 5), (0.0,), p_rotation=1.0, scale=(1.0, 1.0), p_scale=0.0)
    transform._draw_matrix = lambda: np.diag([1.0, 2.0])  # zoom out along array axis 1 only
    out = transform(data=data.copy(), seg=np.zeros_like(data))["data"][0, 0]
    # centre (3, 5) of the sample, (2, 2) of the patch: out[i, j] = in[3 + (i - 2), 5 + 2 (j - 2)]
    expected = data[0, 0][1:6, 1:10:2]
    assert np.allclose(out, expected, atol=1e-4), out


def test_rotate_scale_crop_axis_order_3d():
    from autoseg.training.augmentation import RotateScaleCrop

    data = np.arange(5 * 7 * 11, dtype=np.float32).reshape(1, 1, 5, 7, 11)
    transform = RotateScaleCrop((3, 3, 5), (0.0, 0.0, 0.0), p_rotation=1.0, scale=(1.0, 1.0), p_scale=0.0)
    transform._draw_matrix = lambda: np.diag([1.0, 1.0, 2.0])
    out = transform(data=data.copy(), seg=np.zeros_like(data))["data"][0, 0]
    assert np.allclose(out, data[0, 0][1:4, 2:5, 1:10:2], atol=1e-3)
    # a quarter turn in the plane of axes 1 and 2 (about axis 0) keeps every slice along axis 0 apart
    transform._draw_matrix = lambda: np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
    cube = np.arange(5 * 9 * 9, dtype=np.float32).reshape(1, 1, 5, 9, 9)
    turned = RotateScaleCrop((3, 5, 5), (0.0,) * 3, 1.0, (1.0, 1.0), 0.0)
    turned._draw_matrix = transform._draw_matrix
    out = turned(data=cube.copy(), seg=np.zeros_like(cube))["data"][0, 0]
    crop = cube[0, 0][1:4, 2:7, 2:7]
    assert any(np.allclose(out, np.rot90(crop, k=k, axes=(1, 2)), atol=1e-3) for k in (1, 3))


def test_rotate_scale_crop_matches_one_hot_argmax_and_affine_grid():
    import torch
    import torch.nn.functional as F

    from autoseg.training.augmentation import RotateScaleCrop, rotation_matrix

    rng = np.random.default_rng(4)
    data = rng.normal(size=(3, 2, 15, 17, 16)).astype(np.float32)
    seg = np.zeros((3, 1, 15, 17, 16), dtype=np.float32)
    seg[:, :, 3:12, 4:14, 3:13] = rng.integers(0, 4, size=(3, 1, 9, 10, 10))
    transform = RotateScaleCrop((7, 9, 8), (0.5,) * 3, p_rotation=1.0, scale=(0.9, 1.1), p_scale=0.0)
    matrix = rotation_matrix([0.3, -0.2, 0.4]) * 0.9
    draws = iter([matrix, None, matrix])  # the middle sample is only cropped
    transform._draw_matrix = lambda: next(draws)
    out = transform(data=data.copy(), seg=seg.copy())
    grid = transform._grid(matrix, data.shape[2:])
    # the cached base grid gives torch's affine_grid for the same map
    half_in, half_patch = (np.array(data.shape[2:]) - 1) / 2, (np.array((7, 9, 8)) - 1) / 2
    theta = np.zeros((3, 4), dtype=np.float32)
    theta[:, :3] = ((matrix * half_patch[None]) / half_in[:, None])[::-1, ::-1]
    reference_grid = F.affine_grid(torch.from_numpy(theta)[None], [1, 1, 7, 9, 8], align_corners=True)
    assert torch.allclose(grid, reference_grid, atol=1e-6)
    # labels: argmax of the linearly interpolated one-hot of every label, background included
    for b in (0, 2):
        one_hot = torch.from_numpy(np.stack([seg[b, 0] == k for k in range(4)]).astype(np.float32))[None]
        weights = F.grid_sample(one_hot, grid, mode="bilinear", align_corners=True)[0]
        assert np.array_equal(out["seg"][b, 0], weights.argmax(0).numpy().astype(np.float32))
        image = F.grid_sample(torch.from_numpy(data[b])[None], grid, mode="bilinear", align_corners=True)[0]
        assert np.allclose(out["data"][b], image.numpy(), atol=1e-5)
    assert np.array_equal(out["data"][1], data[1][:, 4:11, 4:13, 4:12])
    assert np.array_equal(out["seg"][1], seg[1][:, 4:11, 4:13, 4:12])


@pytest.mark.parametrize("dims", [3, 2])
def test_both_store_formats_give_identical_batches(tiny3d, tmp_path, dims):
    from autoseg.preprocessing.store import list_stored_cases, load_case, save_case

    source = tiny3d / "preprocessed" / DATASET / "3d_fullres"
    cases = list_stored_cases(source)[:3]
    for array_format in ("b2nd", "npy"):
        for case_id in cases:
            data, label, properties = load_case(source, case_id, mmap=False)
            save_case(tmp_path / array_format, data, label, properties, patch_size=(8, 16, 16),
                      array_format=array_format)
    patch = (12, 16, 16) if dims == 3 else (16, 16)
    settings = augmentation_settings(patch)
    transforms = training_transforms(patch, settings, [(1.0,) * dims, (0.5,) * dims])
    batches = {}
    for array_format in ("b2nd", "npy"):
        sampler = PatchSampler(tmp_path / array_format, cases, sample_size_for(patch, settings), 3, dims)
        assert type(sampler.arrays(cases[0])[0]).__name__ == ("NDArray" if array_format == "b2nd" else "memmap")
        loader = BatchLoader(sampler, transforms, num_workers=0, seed=11)
        batches[array_format] = [next(loader) for _ in range(2)]
    for b2nd_batch, npy_batch in zip(batches["b2nd"], batches["npy"]):
        assert b2nd_batch["keys"] == npy_batch["keys"]
        assert np.array_equal(b2nd_batch["data"].numpy(), npy_batch["data"].numpy())
        assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(b2nd_batch["target"], npy_batch["target"]))
        assert b2nd_batch["data"].abs().sum() > 0


def test_sampler_keeps_a_bounded_number_of_cases_open(tiny3d, monkeypatch):
    import autoseg.training.data as data_module

    monkeypatch.setattr(data_module, "OPEN_CASES", 2)
    folder = tiny3d / "preprocessed" / DATASET / "3d_fullres"
    sampler = PatchSampler(folder, ["case_000", "case_001", "case_002"], (8, 16, 16), 2, 3)
    for case_id in ["case_000", "case_001", "case_000", "case_002"]:
        sampler.arrays(case_id)
    assert list(sampler._arrays) == ["case_000", "case_002"]  # case_001 was the least recently used
    batch = sampler.sample_batch(np.random.default_rng(0), 6)
    assert len(sampler._arrays) == 2 and batch["data"].shape == (6, 1, 8, 16, 16)
