"""`autoseg ensemble`: averaging saved probabilities of several prediction folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoseg.errors import PredictionError
from autoseg.inference import ensemble_folders
from autoseg.inference.outputs import read_probabilities, write_probabilities
from autoseg.io import Geometry, read_segmentation, write_segmentation

GEOMETRY = Geometry((4, 5, 6), (3.0, 0.5, 0.7), (1.0, -2.0, 3.0),
                    tuple(np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).ravel()))


def _random_probabilities(seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(3, *GEOMETRY.shape))
    exp = np.exp(logits)
    return (exp / exp.sum(0)).astype(np.float32)


def _folder(path: Path, cases: dict[str, np.ndarray], ending: str = ".nii.gz") -> Path:
    for case_id, probabilities in cases.items():
        write_probabilities(path / f"{case_id}.npz", probabilities, GEOMETRY, ending)
    return path


def test_probabilities_file_roundtrip_without_pickle(tmp_path: Path) -> None:
    probabilities = _random_probabilities(0)
    write_probabilities(tmp_path / "a.npz", probabilities, GEOMETRY, ".nrrd")
    with np.load(tmp_path / "a.npz", allow_pickle=False) as npz:
        assert npz["probabilities"].dtype == np.float16
    loaded, geometry, ending = read_probabilities(tmp_path / "a.npz")
    np.testing.assert_allclose(loaded, probabilities, atol=1e-3)
    assert geometry == GEOMETRY and ending == ".nrrd"


def test_ensemble_of_identical_folders_equals_one(tmp_path: Path) -> None:
    cases = {"a": _random_probabilities(1), "b": _random_probabilities(2)}
    first = _folder(tmp_path / "first", cases)
    second = _folder(tmp_path / "second", cases)
    written = ensemble_folders([first, second], tmp_path / "out", save_probabilities=True)
    assert [p.name for p in written] == ["a.nii.gz", "b.nii.gz"]
    for case_id, probabilities in cases.items():
        segmentation, geometry = read_segmentation(tmp_path / "out" / f"{case_id}.nii.gz")
        assert geometry.mismatch(GEOMETRY) == []
        stored, _, _ = read_probabilities(first / f"{case_id}.npz")
        np.testing.assert_array_equal(segmentation, stored.argmax(0))
        averaged, _, _ = read_probabilities(tmp_path / "out" / f"{case_id}.npz")
        np.testing.assert_allclose(averaged, stored, atol=1e-3)


def test_ensemble_is_argmax_of_mean(tmp_path: Path) -> None:
    p1, p2 = _random_probabilities(3), _random_probabilities(4)
    ensemble_folders([_folder(tmp_path / "x", {"c": p1}), _folder(tmp_path / "y", {"c": p2}, ".nrrd")],
                     tmp_path / "out")
    segmentation, _ = read_segmentation(tmp_path / "out" / "c.nii.gz")  # first folder's ending wins
    mean = (read_probabilities(tmp_path / "x" / "c.npz")[0] + read_probabilities(tmp_path / "y" / "c.npz")[0]) / 2
    np.testing.assert_array_equal(segmentation, mean.argmax(0))
    assert (segmentation != p1.argmax(0)).any() and (segmentation != p2.argmax(0)).any()  # really a mix


def test_ensemble_different_cases_is_a_clear_error(tmp_path: Path) -> None:
    first = _folder(tmp_path / "first", {"a": _random_probabilities(1), "b": _random_probabilities(2)})
    second = _folder(tmp_path / "second", {"a": _random_probabilities(1)})
    with pytest.raises(PredictionError, match=r"second.*lacks b"):
        ensemble_folders([first, second], tmp_path / "out")
    with pytest.raises(PredictionError, match="at least two"):
        ensemble_folders([first], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_validation_npz_without_geometry_uses_segmentation_beside_it(tmp_path: Path) -> None:
    probabilities = _random_probabilities(5)
    folder = tmp_path / "validation"
    folder.mkdir()
    np.savez_compressed(folder / "v.npz", probabilities=probabilities.astype(np.float16))
    write_segmentation(probabilities.argmax(0), GEOMETRY, folder / "v.mha")
    loaded, geometry, ending = read_probabilities(folder / "v.npz")
    assert ending == ".mha" and geometry.mismatch(GEOMETRY) == []
    (folder / "v.mha").unlink()
    with pytest.raises(Exception, match="no geometry"):
        read_probabilities(folder / "v.npz")


def test_cli_ensemble_rejects_a_missing_postprocessing_file(tmp_path, capsys):
    from autoseg.cli import main

    code = main(["ensemble", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--postprocessing", str(tmp_path / "nope")])
    assert code == 1
    assert "no postprocessing.json" in capsys.readouterr().err


def test_slab_written_probabilities_file_equals_the_whole_array_format(tmp_path: Path) -> None:
    """probabilities_file (filled slab by slab, as predict does) writes what write_probabilities writes: same
    members, same arrays, readable without pickle and by the ensemble."""
    import zipfile

    from autoseg.inference.outputs import probabilities_file

    whole, first = _random_probabilities(5), _random_probabilities(6)
    write_probabilities(tmp_path / "whole" / "a.npz", whole, GEOMETRY, ".nii.gz")
    with probabilities_file(tmp_path / "slabs" / "a.npz", whole.shape, GEOMETRY, ".nii.gz") as target:
        assert target.dtype == np.float16 and target.shape == whole.shape
        for z in range(GEOMETRY.shape[0]):
            target[:, z] = whole[:, z]
    assert sorted(p.name for p in (tmp_path / "slabs").iterdir()) == ["a.npz"]  # scratch file removed
    with zipfile.ZipFile(tmp_path / "slabs" / "a.npz") as archive:
        assert sorted(archive.namelist()) == ["file_ending.npy", "geometry.npy", "probabilities.npy"]
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    with np.load(tmp_path / "whole" / "a.npz", allow_pickle=False) as a, \
            np.load(tmp_path / "slabs" / "a.npz", allow_pickle=False) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])
    probabilities, geometry, ending = read_probabilities(tmp_path / "slabs" / "a.npz")
    assert ending == ".nii.gz" and geometry.mismatch(GEOMETRY) == []
    np.testing.assert_array_equal(probabilities, whole.astype(np.float16).astype(np.float32))
    write_probabilities(tmp_path / "other" / "a.npz", first, GEOMETRY, ".nii.gz")
    written = ensemble_folders([tmp_path / "slabs", tmp_path / "other"], tmp_path / "ensemble")
    segmentation, _ = read_segmentation(written[0])
    mean = (whole.astype(np.float16).astype(np.float32) + first.astype(np.float16).astype(np.float32)) / 2
    top_two = np.sort(mean, axis=0)[-2:]
    clear = top_two[1] - top_two[0] > 1e-3
    np.testing.assert_array_equal(segmentation[clear], np.argmax(mean, axis=0)[clear])


def test_probabilities_file_leaves_nothing_when_filling_fails(tmp_path: Path) -> None:
    from autoseg.inference.outputs import probabilities_file

    with pytest.raises(RuntimeError, match="restore failed"):
        with probabilities_file(tmp_path / "a.npz", (3, *GEOMETRY.shape), GEOMETRY, ".nii.gz"):
            raise RuntimeError("restore failed")
    assert list(tmp_path.iterdir()) == []
