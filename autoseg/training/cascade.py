"""Inputs of a cascade stage (``3d_cascade_fullres``): the previous stage's segmentation of each case, on the
cascade's preprocessed grid, read by the patch sampler beside the image and label.

For a training case that segmentation must come from a model that never saw the case, or the cascade learns
to copy a too-good input: it is the previous stage's *cross-validation* prediction, written by
``autoseg train <dataset> 3d_lowres <fold>`` into ``fold_<k>/validation/`` for the fold whose validation set
holds the case (the same splits.json serves both stages). At prediction time the previous stage predicts
the new image first (``Predictor.from_folder``), so both paths feed the network the same kind of input.

The converted maps live in ``preprocessed/<dataset>/<data_identifier>__from_<previous>__<arch>/<case>.b2nd``
(int8 ``[1, Z, Y, X]`` in the store's array format; ``.npy`` from earlier runs is still read), written
atomically and redone when the prediction they came from is newer, so retraining a low-resolution fold never
leaves stale cascade inputs behind.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from autoseg.contracts.plans import Configuration, Plans
from autoseg.errors import ConfigurationError, PreprocessingError
from autoseg.io import read_segmentation
from autoseg.paths import DatasetLocation, fold_folder
from autoseg.preprocessing.case import preprocess_label
from autoseg.preprocessing.store import array_file, load_properties, open_array, save_array

log = logging.getLogger(__name__)


def previous_stage_folder(location: DatasetLocation, plans: Plans, config: Configuration) -> Path:
    """Where the previous stage's segmentations on ``config``'s grid are kept (see the module docstring)."""
    previous = plans.configuration(str(config.previous_stage))
    return location.preprocessed / f"{config.data_identifier}__from_{previous.name}__{previous.architecture.name}"


def previous_stage_sources(
    location: DatasetLocation,
    plans: Plans,
    config: Configuration,
    splits: Sequence[dict[str, list[str]]],
    case_ids: Sequence[str],
    root: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """The previous stage's cross-validation prediction file of each case; a clear error naming the folds
    still to train (or the cases no fold validates) when any is missing. ``root``: the data root the user
    passed, repeated in the commands the error suggests."""
    previous = plans.configuration(str(config.previous_stage))
    fold_of = {case: fold for fold, split in enumerate(splits) for case in split["val"]}
    unvalidated = sorted(c for c in case_ids if c not in fold_of)
    if unvalidated:
        raise ConfigurationError(
            f"{location.preprocessed / 'splits.json'}: case(s) {', '.join(unvalidated[:5])} are in no fold's "
            f"validation set, so {previous.name} has no cross-validation prediction of them for the cascade "
            f"{config.name}; put every case in exactly one fold's 'val' list"
        )
    sources: dict[str, Path] = {}
    missing: dict[int, int] = {}
    for case in case_ids:
        fold = fold_of[case]
        path = fold_folder(location, previous.name, previous.architecture.name, fold) / "validation" / \
            f"{case}{plans.file_ending}"
        if path.is_file():
            sources[case] = path
        else:
            missing[fold] = missing.get(fold, 0) + 1
    if missing:
        folds = sorted(missing)
        suffix = f" --root {root}" if root is not None else ""
        commands = "; ".join(f"autoseg train {location.name} {previous.name} {fold}{suffix}" for fold in folds)
        raise ConfigurationError(
            f"{config.name} is a cascade stage: its extra inputs are the cross-validation predictions of "
            f"{previous.name}, and {sum(missing.values())} are missing (fold(s) {', '.join(map(str, folds))} of "
            f"{fold_folder(location, previous.name, previous.architecture.name, 0).parent} not trained or not "
            f"validated). Train them first: {commands}"
        )
    return sources


def _is_current(target: Path | None, source: Path) -> bool:
    return target is not None and target.stat().st_mtime_ns >= source.stat().st_mtime_ns


def prepare_previous_stage(
    location: DatasetLocation,
    plans: Plans,
    config: Configuration,
    store: Path,
    splits: Sequence[dict[str, list[str]]],
    case_ids: Sequence[str],
    say: Callable[[str], None] = log.info,
) -> Path:
    """Convert the previous stage's cross-validation predictions of ``case_ids`` onto ``config``'s
    preprocessed grid (crop box and resampling of each case's stored properties); returns their folder."""
    sources = previous_stage_sources(location, plans, config, splits, case_ids)
    folder = previous_stage_folder(location, plans, config)
    todo = [case for case, source in sources.items() if not _is_current(array_file(folder, case), source)]
    if todo:
        say(f"cascade: converting {len(todo)} prediction(s) of {config.previous_stage} onto the "
            f"{config.data_identifier} grid -> {folder}")
    for case in tqdm(todo, desc="cascade inputs", unit="case", disable=not todo):
        segmentation, _ = read_segmentation(sources[case])
        converted = preprocess_label(segmentation, load_properties(store, case), config)
        save_array(folder, case, converted.astype(np.int8, copy=False), patch_size=config.patch_size)
    return folder


def load_previous_stage(folder: Path, case_id: str, mmap: bool = False) -> np.ndarray:
    """int8 ``[1, Z, Y, X]`` previous-stage segmentation of a case, as written by :func:`prepare_previous_stage`
    (``mmap``: opened lazily, see ``autoseg.preprocessing.store.open_array``; else read into memory)."""
    path = array_file(folder, case_id)
    if path is None:
        raise PreprocessingError(
            f"{folder / case_id}: previous-stage segmentation (.b2nd or .npy) missing; "
            "run `autoseg train` for the cascade again, which converts the previous stage's predictions"
        )
    return open_array(path, mmap=mmap)
