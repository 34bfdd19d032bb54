"""`autoseg info`: what autoseg sees (versions, device, data root) and where each dataset stands."""
from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

from autoseg import __version__, paths

_PACKAGES = ("torch", "numpy", "scipy", "SimpleITK", "nibabel", "batchgenerators", "acvl-utils",
             "connected-components-3d", "matplotlib", "tqdm")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def dataset_state(location: paths.DatasetLocation) -> str:
    """``raw``, ``planned``, ``preprocessed`` and the trained folds of each results folder, in one line."""
    parts = []
    if (location.raw / "dataset.json").is_file():
        parts.append("raw")
    if (location.preprocessed / "plans.json").is_file():
        parts.append("planned")
        stored = [p.name for p in location.preprocessed.iterdir() if p.is_dir() and any(p.glob("*.json"))]
        if stored:
            parts.append("preprocessed: " + ", ".join(sorted(stored)))
    if location.results.is_dir():
        for model in sorted(p for p in location.results.iterdir() if p.is_dir()):
            done = sorted(f.name.removeprefix("fold_") for f in model.glob("fold_*") if (f / "checkpoint_final.pt").is_file())
            if done:
                parts.append(f"{model.name} folds {','.join(done)}")
    return "; ".join(parts) if parts else "empty"


def _dataset_folders(root: str | None) -> list[Path]:
    seen: dict[str, Path] = {}
    for base in (paths.raw_root(root), *paths.extra_raw_roots(), paths.preprocessed_root(root)):
        if base.is_dir():
            for folder in sorted(base.iterdir()):
                if folder.is_dir() and paths.parse_dataset_folder_name(folder.name):
                    seen.setdefault(folder.name, folder)
    return list(seen.values())


def print_info(root: str | None = None) -> None:
    import torch

    from autoseg.device import choose_device

    print(f"autoseg {__version__} on Python {platform.python_version()} ({platform.platform()})")
    for name, version in package_versions().items():
        print(f"  {name:24s} {version}")
    device = choose_device("auto")
    detail = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device (auto): {device} ({detail})")
    print(f"data root: {paths.data_root(root)}")
    for variable, value in paths.environment_summary().items():
        print(f"  {variable} = {value if value is not None else '(not set)'}")
    folders = _dataset_folders(root)
    if not folders:
        print("datasets: none found (put DatasetXXX_Name folders under raw/, or run `autoseg demo`)")
        return
    print("datasets:")
    for folder in folders:
        location = paths.resolve_dataset(folder.name, root)
        print(f"  {folder.name}: {dataset_state(location)}")
