"""splits.json: the cross-validation folds every stage after planning reads (the contract).

The file is a JSON list of ``{"train": [...], "val": [...]}`` (nnU-Net's format; edit it by hand to choose your
own folds). A fold is named by its 0-based index or ``"all"`` (train and validate on every case). Planning
writes the file (``autoseg.planning.splits.create_splits`` decides the folds); training, the cascade and the
benchmarks read it through here, with one parser for fold names and one set of messages.
"""
from __future__ import annotations

import os
from pathlib import Path

from autoseg.contracts.plans import validate_identifier
from autoseg.errors import ConfigurationError
from autoseg.fileio import read_json

SPLITS_FILE = "splits.json"
ALL_FOLD = "all"


def load_splits(preprocessed_dir: str | os.PathLike) -> list[dict[str, list[str]]]:
    """The folds in ``<preprocessed_dir>/splits.json`` (``[{"train": [...], "val": [...]}, ...]``)."""
    path = Path(preprocessed_dir) / SPLITS_FILE
    if not path.is_file():
        raise ConfigurationError(f"{path}: no splits found; run `autoseg plan {Path(preprocessed_dir).name}` first")
    try:
        data = read_json(path)
    except ValueError as exc:
        raise ConfigurationError(f"{path}: not valid JSON ({exc}); fix it or delete it and re-run `autoseg plan`") from exc
    valid = isinstance(data, list) and data and all(
        isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list) for f in data
    )
    if not valid:
        raise ConfigurationError(
            f"{path}: expected a list of {{\"train\": [...], \"val\": [...]}} folds, found {type(data).__name__}; "
            "fix it or delete it and re-run `autoseg plan`"
        )
    return [{"train": [str(c) for c in f["train"]], "val": [str(c) for c in f["val"]]} for f in data]


def parse_fold(fold: int | str, num_folds: int, splits_file: str | os.PathLike) -> int | str:
    """``fold`` as the index ``0..num_folds-1`` (int) or ``"all"``; anything else is a ConfigurationError naming
    ``splits_file``. Accepts ints and their decimal strings (the command line gives strings), ``"all"`` in any
    case, surrounding blanks ignored."""
    text = str(fold).strip().lower()
    if text == ALL_FOLD:
        return ALL_FOLD
    if text.isdigit() and int(text) < num_folds:
        return int(text)
    raise ConfigurationError(
        f"{splits_file}: fold {fold!r} does not exist; expected 0-{num_folds - 1} or '{ALL_FOLD}' "
        f"(splits.json lists {num_folds} folds)"
    )


def fold_cases(preprocessed_dir: str | os.PathLike, fold: int | str) -> tuple[list[str], list[str]]:
    """``(train_ids, val_ids)`` of ``fold`` (0-based index or ``"all"``: every case, sorted, for both).

    Every case id of the file must be a safe path component (:func:`autoseg.contracts.plans.validate_identifier`):
    case ids become file names in the preprocessed store and in ``validation/``, so a hand-edited splits.json
    cannot make a stage read or write outside its folder.
    """
    path = Path(preprocessed_dir) / SPLITS_FILE
    splits = load_splits(preprocessed_dir)
    fold = parse_fold(fold, len(splits), path)
    for index, split in enumerate(splits):
        for part in ("train", "val"):
            for case_id in split[part]:
                validate_identifier(case_id, f"fold {index} {part} case id", path)
    if fold == ALL_FOLD:
        every = sorted({c for split in splits for c in split["train"] + split["val"]})
        return every, list(every)
    return list(splits[fold]["train"]), list(splits[fold]["val"])
