"""The preprocessed store's two array formats (blosc2 .b2nd and .npy): round trips, patch reads, atomicity."""
from __future__ import annotations

import blosc2
import numpy as np
import pytest

from autoseg.errors import PreprocessingError
from autoseg.io import Geometry
from autoseg.preprocessing import store
from autoseg.preprocessing.store import (
    CaseProperties,
    array_file,
    blosc2_chunking,
    is_complete,
    list_stored_cases,
    load_case,
    open_array,
    save_array,
    save_case,
)

SHAPE = (9, 21, 34)  # odd sizes: chunks and blocks do not divide them


def _case(case_id: str = "case_000", channels: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((channels, *SHAPE)).astype(np.float32)
    data[:, :2] = 0.0  # a constant region, as clipped air is, next to noise
    label = rng.integers(-1, 5, size=(1, *SHAPE)).astype(np.int8)
    geometry = Geometry(shape=SHAPE, spacing=(2.0, 0.5, 0.5), origin=(0.0, 0.0, 0.0),
                        direction=tuple(np.eye(3).ravel().tolist()))
    properties = CaseProperties(
        case_id=case_id, geometry=geometry, original_spacing=[2.0, 0.5, 0.5], shape_before_crop=list(SHAPE),
        bbox=[[0, n] for n in SHAPE], shape_after_crop=list(SHAPE), spacing_after_resampling=[2.0, 0.5, 0.5],
        shape_after_resampling=list(SHAPE), class_locations={"1": [[1, 2, 3]]},
    )
    return data, label, properties


@pytest.mark.parametrize("array_format", ["b2nd", "npy"])
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_is_exact(tmp_path, array_format, mmap):
    data, label, properties = _case()
    save_case(tmp_path, data, label, properties, patch_size=(4, 8, 16), array_format=array_format)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["case_000.json", f"case_000.{array_format}", f"case_000_seg.{array_format}"])
    loaded, loaded_label, loaded_properties = load_case(tmp_path, "case_000", mmap=mmap)
    assert loaded.shape == data.shape and loaded.dtype == np.float32
    assert loaded_label.shape == label.shape and loaded_label.dtype == np.int8
    assert np.array_equal(np.asarray(loaded), data) and np.array_equal(np.asarray(loaded_label), label)
    assert loaded_properties == properties
    if not mmap:
        assert type(loaded) is np.ndarray and type(loaded_label) is np.ndarray
    assert is_complete(tmp_path, "case_000") and list_stored_cases(tmp_path) == ["case_000"]


def test_b2nd_is_the_default_and_compresses(tmp_path):
    data, label, properties = _case()
    data[:] = 0.0  # all constant: any compression at all shows
    save_case(tmp_path, data, label, properties, patch_size=(4, 8, 16))
    image_file = array_file(tmp_path, "case_000")
    assert image_file == tmp_path / "case_000.b2nd"
    assert image_file.stat().st_size < data.nbytes / 10


def test_patch_reads_equal_numpy_slicing(tmp_path):
    data, label, _ = _case(channels=2)
    path = save_array(tmp_path, "image", data, "b2nd", patch_size=(4, 8, 8))
    stored = open_array(path)
    assert isinstance(stored, blosc2.NDArray) and stored.chunks != data.shape  # really chunked, really lazy
    rng = np.random.default_rng(3)
    for _ in range(25):
        size = [int(rng.integers(1, n + 1)) for n in SHAPE]
        start = [int(rng.integers(0, n - s + 1)) for n, s in zip(SHAPE, size)]
        region = (slice(None),) + tuple(slice(a, a + s) for a, s in zip(start, size))
        assert np.array_equal(stored[region], data[region])
        z = int(rng.integers(0, SHAPE[0]))  # 2D configurations read single slices
        assert np.array_equal(stored[(slice(None), z) + region[2:]], data[(slice(None), z) + region[2:]])


def test_chunking_follows_the_patch():
    # 128^3 patch: quarter-patch blocks (32^3) halved down to 16 KiB, Z first; patch-sized chunks
    assert blosc2_chunking((1, 400, 512, 512), (128, 128, 128), 4) == ((1, 128, 128, 128), (1, 16, 16, 16))
    assert blosc2_chunking((1, 400, 512, 512), (128, 128, 128), 1) == ((1, 128, 128, 128), (1, 16, 32, 32))
    # a patch that is not a multiple of the block: chunks rounded to whole blocks (80 -> 5 x 16)
    assert blosc2_chunking((1, 400, 512, 512), (80, 160, 192), 4) == ((1, 80, 160, 192), (1, 16, 16, 16))
    # 2D patches read single slices: Z stays 1
    assert blosc2_chunking((3, 50, 512, 512), (512, 512), 4) == ((1, 1, 512, 512), (1, 1, 64, 64))
    # never longer than the image; blocks within the byte cap
    chunks, blocks = blosc2_chunking((1, 5, 300, 20), (64, 256, 256), 4)
    assert chunks[1] <= 5 and chunks[3] <= 20 and blocks[1] <= 5 and blocks[3] <= 20
    assert np.prod(blocks) * 4 <= store.MAX_BLOCK_BYTES
    assert all(c % b == 0 or c == s for c, b, s in zip(chunks, blocks, (1, 5, 300, 20)))


def test_old_npy_store_still_loads_and_a_rerun_converts_it(tmp_path):
    data, label, properties = _case()
    save_case(tmp_path, data, label, properties, array_format="npy")  # as an earlier version wrote it
    assert is_complete(tmp_path, "case_000")
    assert np.array_equal(load_case(tmp_path, "case_000")[0], data)
    save_case(tmp_path, data, label, properties)  # rewritten in the default format: no stale .npy left
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".b2nd", ".b2nd", ".json"]
    assert np.array_equal(np.asarray(load_case(tmp_path, "case_000")[1]), label)


def test_interrupted_write_leaves_no_complete_looking_case(tmp_path, monkeypatch):
    data, label, properties = _case()
    save_case(tmp_path, data, label, properties)
    assert is_complete(tmp_path, "case_000")

    def dies_during_the_label(array, **kwargs):
        if array.dtype == np.int8:
            raise KeyboardInterrupt  # as a killed run
        return real(array, **kwargs)

    real = blosc2.asarray
    monkeypatch.setattr(blosc2, "asarray", dies_during_the_label)
    with pytest.raises(KeyboardInterrupt):
        save_case(tmp_path, data * 2, label, properties)
    assert not is_complete(tmp_path, "case_000") and list_stored_cases(tmp_path) == []
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_written_array_is_checked_before_it_replaces_anything(tmp_path, monkeypatch):
    data, _, _ = _case()
    real = blosc2.asarray
    monkeypatch.setattr(blosc2, "asarray", lambda array, **kwargs: real(array[:, :-1], **kwargs))  # short write
    with pytest.raises(PreprocessingError, match="reads back as"):
        save_array(tmp_path, "image", data, "b2nd")
    assert list(tmp_path.iterdir()) == []


def test_truncated_or_foreign_b2nd_is_not_a_complete_case(tmp_path):
    data, label, properties = _case()
    save_case(tmp_path, data, label, properties)
    image_file = tmp_path / "case_000.b2nd"
    image_file.write_bytes(image_file.read_bytes()[: image_file.stat().st_size // 2])
    assert not is_complete(tmp_path, "case_000")
    with pytest.raises(PreprocessingError, match="case_000.b2nd"):
        load_case(tmp_path, "case_000")
    # a blosc2 container that is not a plain NDArray (here a raw super-chunk) is refused, not interpreted
    image_file.unlink()
    blosc2.SChunk(chunksize=64, data=b"\x00" * 256, urlpath=str(image_file), mode="w")
    with pytest.raises(PreprocessingError, match="not a plain blosc2 NDArray"):
        load_case(tmp_path, "case_000")


def test_case_without_label_and_missing_arrays(tmp_path):
    data, label, properties = _case()
    save_case(tmp_path, data, None, properties)
    assert load_case(tmp_path, "case_000")[1] is None
    assert is_complete(tmp_path, "case_000", with_label=False) and not is_complete(tmp_path, "case_000")
    (tmp_path / "case_000.b2nd").unlink()
    with pytest.raises(PreprocessingError, match="re-run `autoseg preprocess`"):
        load_case(tmp_path, "case_000")
