"""Data root and dataset name resolution: folder name, number (4, 004), name, nnUNet_raw, errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from autoseg.errors import DatasetError
from autoseg.paths import (
    data_root,
    dataset_folder_name,
    fold_folder,
    parse_dataset_folder_name,
    resolve_dataset,
    results_folder,
)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("AUTOSEG_HOME", raising=False)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    base = tmp_path / "home"
    for name in ("Dataset004_Hippocampus", "Dataset201_ISBIEM"):
        (base / "raw" / name).mkdir(parents=True)
    return base


@pytest.mark.parametrize("identifier", ["Dataset004_Hippocampus", "4", "004", 4, "Hippocampus", "hippocampus"])
def test_resolution_by_folder_number_and_name(root: Path, identifier: str | int) -> None:
    location = resolve_dataset(identifier, root)
    assert location.name == "Dataset004_Hippocampus" and location.number == 4
    assert location.raw == root / "raw" / "Dataset004_Hippocampus"
    assert location.preprocessed == root / "preprocessed" / "Dataset004_Hippocampus"
    assert location.results == root / "results" / "Dataset004_Hippocampus"
    assert results_folder(location, "3d_fullres", "unet") == location.results / "3d_fullres__unet"
    assert fold_folder(location, "2d", "unet", 3) == location.results / "2d__unet" / "fold_3"


def test_path_to_a_folder_is_accepted(root: Path) -> None:
    location = resolve_dataset(str(root / "raw" / "Dataset201_ISBIEM"), root)
    assert location.name == "Dataset201_ISBIEM" and location.raw == root / "raw" / "Dataset201_ISBIEM"


def test_nnunet_raw_is_an_extra_location(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = tmp_path / "nnUNet_raw"
    (extra / "Dataset027_ACDC").mkdir(parents=True)
    (extra / "Dataset004_Hippocampus").mkdir()  # same name in both: our own raw folder wins
    with pytest.raises(DatasetError, match="no dataset called '27'"):
        resolve_dataset("27", root)
    monkeypatch.setenv("nnUNet_raw", str(extra))
    location = resolve_dataset("27", root)
    assert location.raw == extra / "Dataset027_ACDC"
    assert location.preprocessed == root / "preprocessed" / "Dataset027_ACDC"  # derived data stays in our root
    assert resolve_dataset("4", root).raw == root / "raw" / "Dataset004_Hippocampus"


def test_preprocessed_only_dataset_is_found(root: Path) -> None:
    (root / "preprocessed" / "Dataset300_Copied").mkdir(parents=True)
    assert resolve_dataset("300", root).name == "Dataset300_Copied"


def test_ambiguous_identifier_lists_candidates(root: Path) -> None:
    (root / "raw" / "Dataset004_Liver").mkdir()
    with pytest.raises(DatasetError, match="matches several datasets: Dataset004_Hippocampus, Dataset004_Liver"):
        resolve_dataset("004", root)
    assert resolve_dataset("Liver", root).name == "Dataset004_Liver"


def test_not_found_names_what_exists_and_the_fix(root: Path) -> None:
    with pytest.raises(DatasetError) as info:
        resolve_dataset("Prostate", root)
    message = str(info.value)
    assert "Dataset004_Hippocampus, Dataset201_ISBIEM" in message and "--root" in message
    assert "\n" not in message


def test_data_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOSEG_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert data_root() == tmp_path.resolve() / "autoseg_data"
    monkeypatch.setenv("AUTOSEG_HOME", str(tmp_path / "env"))
    assert data_root() == (tmp_path / "env").resolve()
    assert data_root(tmp_path / "flag") == (tmp_path / "flag").resolve()  # --root beats the environment


def test_folder_name_helpers() -> None:
    assert dataset_folder_name(4, "Hippocampus") == "Dataset004_Hippocampus"
    assert parse_dataset_folder_name("Dataset202_CHASEDB1") == (202, "CHASEDB1")
    assert parse_dataset_folder_name("Task04_Hippocampus") is None
    with pytest.raises(DatasetError, match="outside 0-999"):
        dataset_folder_name(1000, "Big")


def test_ensure_inside_refuses_paths_that_leave_the_parent(tmp_path):
    """Issue 18.6: names from plans.json were joined onto the data root unchecked; '..' or an absolute name
    left it."""
    from autoseg.errors import ConfigurationError
    from autoseg.paths import ensure_inside

    results = tmp_path / "results" / "Dataset001_X"
    assert ensure_inside(results / "2d__unet" / "fold_0", results, "the fold folder") == results / "2d__unet" / "fold_0"
    assert ensure_inside(results / "a..b", results, "x") == results / "a..b"  # dots inside a name are fine
    for escaping in (results / ".." / ".." / "escape", results / "/etc", results / "2d" / ".." / ".."):
        with pytest.raises(ConfigurationError, match="would be outside"):
            ensure_inside(escaping, results, "the fold folder")
    location = _location(tmp_path)
    with pytest.raises(ConfigurationError, match="the fold folder would be outside"):
        fold_folder(location, "../../../escape", "unet", 0)


def _location(root):
    from autoseg.paths import DatasetLocation

    name = "Dataset001_X"
    return DatasetLocation(name, root / "raw" / name, root / "preprocessed" / name, root / "results" / name)
