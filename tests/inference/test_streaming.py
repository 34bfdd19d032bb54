"""Bounded network-grid memory: band-streamed sliding window, folds combined per row block, spill to disk."""
from __future__ import annotations

import math
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autoseg import networks
from autoseg.inference import Predictor, predict
from autoseg.inference import sliding_window, streaming
from autoseg.inference.sliding_window import (
    first_axis_bands,
    iter_log_softmax_rows,
    map_slabs,
    sliding_window_predict,
)
from autoseg.inference.streaming import SpilledArray, stream_log_probabilities
from autoseg.io import Geometry, read_segmentation, write_image

from tests.inference.conftest import build_tiny_network, make_plans

CLASSES = 5


def _tiny_unet(dims: int, seed: int, classes: int = CLASSES) -> nn.Module:
    torch.manual_seed(seed)
    if dims == 3:
        return networks.build(networks.NetworkSpec(
            "unet", 1, classes, patch_size=[8, 16, 16], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]],
            kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]], features=[4, 8, 16], deep_supervision=True,
        )).eval()
    return networks.build(networks.NetworkSpec(
        "unet", 1, classes, patch_size=[16, 16], strides=[[1, 1], [2, 2], [2, 2]],
        kernel_sizes=[[3, 3], [3, 3], [3, 3]], features=[4, 8, 16], deep_supervision=True,
    )).eval()


def _whole_volume_reference(folds, data, patch, dims, batch_size) -> torch.Tensor:
    """What predict_log_probabilities computed before streaming: a whole [K, Z, Y, X] log-softmax per fold,
    combined with logaddexp and shifted by log F, slab by slab in float32."""
    total = None
    for network in folds:
        fold = sliding_window_predict(network, data, patch, dims, CLASSES, mirror=True, batch_size=batch_size,
                                      log_softmax=True)
        total = fold if total is None else map_slabs(total, torch.logaddexp, fold)
    shift = math.log(len(folds))
    return map_slabs(total, lambda block: block - shift)


def test_first_axis_bands_hand_computed() -> None:
    # three windows per start row (0, 4, 8) of a 16-row image
    starts = [0, 0, 0, 4, 4, 4, 8, 8, 8]
    assert first_axis_bands(starts, 16) == [(0, 3, 0, 4), (3, 6, 4, 8), (6, 9, 8, 16)]
    # 2D windows are one row deep and compute_tile_starts repeats rows at step 0.5: rows 1 and 2 twice
    assert first_axis_bands([0, 1, 1, 2, 2], 3) == [(0, 1, 0, 1), (1, 3, 1, 2), (3, 5, 2, 3)]


@pytest.mark.parametrize(
    "dims, patch, shape, batch_size",
    [
        (3, (8, 16, 16), (1, 21, 23, 20), 2),  # Z over two patches, Y and X not multiples of the step
        (3, (8, 16, 16), (1, 21, 16, 40), 3),  # batches of windows cross from one band into the next
        (3, (8, 16, 16), (1, 6, 10, 40), 2),  # smaller than the patch on Z and Y: padded, then cut back
        (2, (16, 16), (1, 4, 21, 20), 2),  # 2D configuration: windows one slice deep
    ],
)
def test_streamed_rows_equal_the_whole_volume_over_two_folds(dims, patch, shape, batch_size) -> None:
    """Mirroring on, step 0.5, two folds: the streamed result against the whole-volume computation.

    The arithmetic is the same step by step (weights summed over the same windows in the same order, each
    window added in float32 and rounded once), and on our CPUs the results are bit-identical; the test
    allows one float16 rounding (relative 2**-10) in case a vectorised log-softmax rounds a block's last
    voxels differently elsewhere."""
    folds = [_tiny_unet(dims, seed) for seed in (0, 1)]
    data = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = _whole_volume_reference(folds, data, patch, dims, batch_size)
        streamed = stream_log_probabilities(folds, data, patch, dims, CLASSES, batch_size=batch_size)
        single = list(iter_log_softmax_rows(folds[0], data, patch, dims, CLASSES, batch_size=batch_size,
                                            block_bytes=1))
    assert isinstance(streamed, torch.Tensor) and streamed.dtype == torch.float16
    assert streamed.shape == reference.shape == (CLASSES, *shape[1:])
    torch.testing.assert_close(streamed.float(), reference.float(), rtol=2**-10, atol=2**-14)
    agreement = (streamed.argmax(0) == reference.argmax(0)).float().mean().item()
    assert agreement >= 0.999, agreement
    # the generator itself: consecutive single rows (block_bytes=1) covering the unpadded image exactly
    assert [(start, stop) for start, stop, _ in single] == [(z, z + 1) for z in range(shape[1])]
    one_fold = sliding_window_predict(folds[0], data, patch, dims, CLASSES, batch_size=batch_size, log_softmax=True)
    torch.testing.assert_close(torch.cat([block for _, _, block in single], 1).float(), one_fold.float(),
                               rtol=2**-10, atol=2**-14)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_band_buffer_is_one_patch_deep_whatever_the_batches(monkeypatch: pytest.MonkeyPatch, batch_size: int) -> None:
    """64 x 16 x 24 voxels, patch 8 x 16 x 16: 15 bands of 2 windows; batches of 5 reach up to 3 bands ahead."""
    shapes, calls = [], []
    allocate = sliding_window._allocate

    def recording_allocate(shape, device, dtype=torch.float32):
        shapes.append(tuple(shape))
        return allocate(shape, device, dtype)

    network = _tiny_unet(3, 0)

    def counted(batch):
        calls.append(batch.shape[0])
        return network(batch)

    monkeypatch.setattr(sliding_window, "_allocate", recording_allocate)
    with torch.inference_mode():
        rows = list(iter_log_softmax_rows(counted, torch.randn(1, 64, 16, 24), (8, 16, 16), 3, CLASSES,
                                          mirror=False, batch_size=batch_size))
    assert shapes == [(CLASSES, 8, 16, 24)]  # never the 64 rows of the volume, nor more than the patch
    assert rows[-1][1] == 64
    windows = 15 * 2
    assert calls == [batch_size] * (windows // batch_size) + ([windows % batch_size] if windows % batch_size else [])


def test_spilled_array_reads_what_was_written(tmp_path: Path) -> None:
    values = np.random.default_rng(0).normal(size=(3, 7, 4, 5)).astype(np.float16)
    with SpilledArray(values.shape, np.float16, tmp_path) as spilled:
        spilled.write_rows(0, values[:, :4])
        spilled.write_rows(4, values[:, 4:])
        assert spilled.shape == values.shape and spilled.dtype == np.float16 and spilled.nbytes == values.nbytes
        for key in [(slice(None), slice(2, 5)), (1, 3), (2, slice(None)), 0, (-1, -2), (slice(None), 6, 1),
                    (slice(1, 3), slice(0, 7), slice(1, 3), 4), (slice(None), slice(5, 5))]:
            np.testing.assert_array_equal(spilled[key], values[key])
        with pytest.raises(TypeError, match="read it by rows"):
            np.asarray(spilled)  # would load the whole volume: refused
        with pytest.raises(TypeError):
            spilled[:, ::2]
        with pytest.raises(IndexError):
            spilled[3, 0]


def test_spilled_prediction_equals_the_in_memory_one(tmp_path: Path) -> None:
    folds = [_tiny_unet(3, seed) for seed in (0, 1)]
    data = torch.randn(1, 20, 16, 24, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        in_memory = stream_log_probabilities(folds, data, (8, 16, 16), 3, CLASSES)
        spilled = stream_log_probabilities(folds, data, (8, 16, 16), 3, CLASSES, ram_bytes=1000,
                                           spill_directory=tmp_path)
    assert isinstance(in_memory, torch.Tensor) and isinstance(spilled, SpilledArray)
    np.testing.assert_array_equal(spilled[:, 0:20], in_memory.numpy())
    spilled.close()


class FailsAfter(nn.Module):
    """A network that raises on its n-th batch, as a GPU running out of memory half-way through would."""

    def __init__(self, network: nn.Module, calls: int) -> None:
        super().__init__()
        self.network, self.calls = network, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("out of memory")
        return self.network(x)


@pytest.mark.parametrize("unlink_open_files", [True, False], ids=["posix", "cannot-remove-open-files"])
def test_spill_file_is_removed_after_success_and_after_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unlink_open_files: bool
) -> None:
    created: list[SpilledArray] = []
    seen_during: list[list[str]] = []

    class Recording(SpilledArray):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

        def write_rows(self, start, block) -> None:
            seen_during.append(sorted(p.name for p in tmp_path.iterdir()))
            super().write_rows(start, block)

    monkeypatch.setattr(streaming, "SpilledArray", Recording)
    if not unlink_open_files:  # as on Windows: the name can only go once the file is closed
        unlink = os.unlink

        def refuse_while_open(path):
            if any(array.path == str(path) and not array._file.closed for array in created) or not created:
                raise PermissionError(13, "file is open", str(path))
            unlink(path)

        monkeypatch.setattr(streaming.os, "unlink", refuse_while_open)
    data = torch.randn(1, 30, 16, 16)
    network = _tiny_unet(3, 0)
    with torch.inference_mode():
        result = stream_log_probabilities([network], data, (8, 16, 16), 3, CLASSES, ram_bytes=0,
                                          spill_directory=tmp_path)
        assert isinstance(result, Recording) and result[:, 29].shape == (CLASSES, 16, 16)
        result.close()
        assert created[0]._file.closed and list(tmp_path.iterdir()) == []
        with pytest.raises(RuntimeError, match="out of memory"):
            stream_log_probabilities([network, FailsAfter(network, 5)], data, (8, 16, 16), 3, CLASSES, ram_bytes=0,
                                     spill_directory=tmp_path)
    assert len(created) == 2 and created[1]._file.closed  # released at once, not when garbage-collected
    assert list(tmp_path.iterdir()) == []
    partials = [names for names in seen_during if names]
    if unlink_open_files:
        assert not partials  # the name is gone from the start: nothing is left even after a kill -9
    else:
        assert partials and all(len(names) == 1 and names[0].endswith(".partial") for names in partials)


def test_peak_memory_with_a_spilled_result_stays_at_the_band_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """160 x 32 x 32 voxels, 50 classes: the float16 result is 16 MiB and goes to disk (RAM budget lowered to
    1 MiB). tracemalloc sees numpy allocations; the band buffer (a torch tensor) is made visible by allocating
    it through numpy. Peak: the band buffer, the restore's slabs and a few single-channel volumes."""
    shape, classes, patch = (160, 32, 32), 50, (16, 32, 32)
    voxels = int(np.prod(shape))
    plans = make_plans(3, patch=patch, spacing=(1.0, 1.0, 1.0))
    plans.labels = {"background": 0, **{f"organ{k}": k for k in range(1, classes)}}
    predictor = Predictor([build_tiny_network(plans)], plans, plans.configurations["3d_fullres"], 1, device="cpu", mirror=False)
    predictor.restore_slab_bytes = 256 << 10
    predictor.result_ram_bytes = 1 << 20

    def traced_allocate(shape_, device, dtype=torch.float32):
        return torch.from_numpy(np.zeros(shape_, dtype=torch.empty((), dtype=dtype).numpy().dtype)), torch.device("cpu")

    monkeypatch.setattr(sliding_window, "_allocate", traced_allocate)
    spilled_results: list[SpilledArray] = []

    class Recording(SpilledArray):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            spilled_results.append(self)

    monkeypatch.setattr(streaming, "SpilledArray", Recording)
    image = np.random.default_rng(7).uniform(1.0, 2.0, shape).astype(np.float32)
    write_image(image, Geometry(shape, (1.0, 1.0, 1.0), (0.0,) * 3, tuple(np.eye(3).ravel())),
                tmp_path / "in" / "big_0000.nii.gz")

    tracemalloc.start()
    try:
        report = predict(tmp_path / "in", tmp_path / "out", "unused", "3d_fullres", predictor=predictor,
                         num_workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok, report.failures
    assert len(spilled_results) == 1 and spilled_results[0].nbytes == 2 * classes * voxels  # on disk, not in RAM
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["big.nii.gz"]  # no spill file left
    band = 2 * classes * patch[0] * shape[1] * shape[2]  # the float16 band buffer, one patch deep
    bound = band + 3 * predictor.restore_slab_bytes + 6 * 4 * voxels  # + image, preprocessing, label map
    full_result = 2 * classes * voxels
    assert bound < full_result / 2
    assert peak < bound, f"peak {peak / 2**20:.1f} MiB above the band bound {bound / 2**20:.1f} MiB"

    # the same case with the result in RAM gives the same segmentation
    predictor.result_ram_bytes = streaming.RESULT_RAM_BYTES
    assert predict(tmp_path / "in", tmp_path / "out_ram", "unused", "3d_fullres", predictor=predictor,
                   num_workers=1).ok
    spilled, _ = read_segmentation(tmp_path / "out" / "big.nii.gz")
    in_memory, _ = read_segmentation(tmp_path / "out_ram" / "big.nii.gz")
    assert len(np.unique(in_memory)) > 1
    np.testing.assert_array_equal(spilled, in_memory)
