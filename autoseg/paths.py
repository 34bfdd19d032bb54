"""Where autoseg keeps its data, and how a dataset is found by name.

This is the only module that reads environment variables. Layout (design.md section 1)::

    $AUTOSEG_HOME/raw/DatasetXXX_Name/{dataset.json, imagesTr/, labelsTr/, imagesTs/}
    $AUTOSEG_HOME/preprocessed/DatasetXXX_Name/{fingerprint.json, plans.json, splits.json, <config>/}
    $AUTOSEG_HOME/results/DatasetXXX_Name/<config>__<arch>/fold_<k>/

``AUTOSEG_HOME`` defaults to ``./autoseg_data``; every command takes ``--root`` to override it.
``nnUNet_raw`` (set by users coming from nnU-Net) is searched as an extra raw location.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from autoseg.errors import ConfigurationError, DatasetError

ENV_HOME = "AUTOSEG_HOME"
ENV_NNUNET_RAW = "nnUNet_raw"
DEFAULT_HOME = "autoseg_data"

_DATASET_FOLDER = re.compile(r"^Dataset(\d{3})_(.+)$")


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$AUTOSEG_HOME``, else ``./autoseg_data``."""
    if root is not None:
        return Path(root).expanduser().resolve()
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser().resolve()
    return (Path.cwd() / DEFAULT_HOME).resolve()


def raw_root(root: str | os.PathLike | None = None) -> Path:
    return data_root(root) / "raw"


def preprocessed_root(root: str | os.PathLike | None = None) -> Path:
    return data_root(root) / "preprocessed"


def results_root(root: str | os.PathLike | None = None) -> Path:
    return data_root(root) / "results"


def extra_raw_roots() -> list[Path]:
    """Raw locations besides our own: ``nnUNet_raw`` when set and existing."""
    env = os.environ.get(ENV_NNUNET_RAW)
    if env and Path(env).is_dir():
        return [Path(env).expanduser().resolve()]
    return []


def environment_summary() -> dict[str, str | None]:
    """The environment variables autoseg reads, for `autoseg info` and training logs."""
    return {ENV_HOME: os.environ.get(ENV_HOME), ENV_NNUNET_RAW: os.environ.get(ENV_NNUNET_RAW)}


@dataclass(frozen=True)
class DatasetLocation:
    """A resolved dataset: its folder name and where each stage keeps its files."""

    name: str  # folder name, e.g. "Dataset004_Hippocampus"
    raw: Path
    preprocessed: Path
    results: Path

    @property
    def number(self) -> int | None:
        match = _DATASET_FOLDER.match(self.name)
        return int(match.group(1)) if match else None


def parse_dataset_folder_name(name: str) -> tuple[int, str] | None:
    """``"Dataset004_Hippocampus"`` -> ``(4, "Hippocampus")``; None for other names."""
    match = _DATASET_FOLDER.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def dataset_folder_name(number: int, name: str) -> str:
    if not 0 <= number <= 999:
        raise DatasetError(f"dataset number {number} is outside 0-999; pick a number with at most three digits")
    return f"Dataset{number:03d}_{name}"


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    """All dataset folders we can see: raw locations first, then preprocessed ones (a dataset may have been
    planned elsewhere and copied here without its raw data)."""
    found: list[Path] = []
    for base in [raw_root(root), *extra_raw_roots(), preprocessed_root(root)]:
        if base.is_dir():
            found.extend(sorted(p for p in base.iterdir() if p.is_dir()))
    return found


def resolve_dataset(identifier: str | int, root: str | os.PathLike | None = None) -> DatasetLocation:
    """Find a dataset by folder name (``Dataset004_Hippocampus``), number (``4``, ``004``) or name
    (``Hippocampus``, case-insensitive). A path to an existing folder is accepted too.

    Raises DatasetError listing what exists when nothing or more than one dataset matches.
    """
    ident = str(identifier).strip()
    as_path = Path(ident)
    if (os.sep in ident or ident.startswith(".")) and as_path.is_dir():
        raw = as_path.resolve()
        return DatasetLocation(raw.name, raw, preprocessed_root(root) / raw.name, results_root(root) / raw.name)

    matches: dict[str, Path] = {}
    for folder in _candidates(root):
        parsed = parse_dataset_folder_name(folder.name)
        hit = folder.name == ident
        if parsed is not None:
            number, short = parsed
            if ident.isdigit() and int(ident) == number:
                hit = True
            elif short.lower() == ident.lower():
                hit = True
        if hit:
            matches.setdefault(folder.name, folder)
    if not matches:
        seen = sorted({p.name for p in _candidates(root)})
        where = ", ".join(str(p) for p in [raw_root(root), *extra_raw_roots()])
        listing = ", ".join(seen) if seen else "none"
        raise DatasetError(
            f"no dataset called '{ident}' under {where} (datasets found: {listing}); put the dataset folder "
            f"there as DatasetXXX_Name, or pass --root / set {ENV_HOME} to the folder that holds raw/"
        )
    if len(matches) > 1:
        raise DatasetError(
            f"'{ident}' matches several datasets: {', '.join(sorted(matches))}; use the full folder name"
        )
    name = next(iter(matches))
    raw_candidates = [b / name for b in [raw_root(root), *extra_raw_roots()] if (b / name).is_dir()]
    raw = raw_candidates[0] if raw_candidates else raw_root(root) / name
    return DatasetLocation(name, raw, preprocessed_root(root) / name, results_root(root) / name)


def results_folder(location: DatasetLocation, configuration: str, architecture: str) -> Path:
    """``results/<dataset>/<configuration>__<architecture>``."""
    return location.results / f"{configuration}__{architecture}"


def fold_folder(location: DatasetLocation, configuration: str, architecture: str, fold: int | str) -> Path:
    return ensure_inside(results_folder(location, configuration, architecture) / f"fold_{fold}", location.results,
                         "the fold folder")


def ensure_inside(path: str | os.PathLike, parent: str | os.PathLike, what: str) -> Path:
    """``path`` when it lies inside ``parent`` once ``..`` is collapsed, else a ConfigurationError: a computed
    output path (from plans.json names, case ids, options) must never reach outside the data root, where a
    stage would write or delete someone else's files. The test is on the names, not on symbolic links, so a
    results folder linked to another disk stays usable."""
    path, parent = Path(path), Path(parent)
    resolved, base = Path(os.path.normpath(os.path.abspath(path))), Path(os.path.normpath(os.path.abspath(parent)))
    if resolved != base and base not in resolved.parents:
        raise ConfigurationError(
            f"{path}: {what} would be outside {parent} (it resolves to {resolved}); a name in plans.json, "
            "splits.json or an option contains a path; use plain names (letters, digits, _ - . +)"
        )
    return path
