"""Cross-validation splits: ``splits.json`` beside plans.json, created once, never silently overwritten.

Five folds (design.md section 2): the case identifiers are sorted, shuffled by
``numpy.random.RandomState(12345)`` and cut into 5 contiguous chunks, the first ``n % 5`` one case larger.
This is the KFold(5, shuffle=True, random_state=12345) procedure nnU-Net uses, so the folds match its
``splits_final.json`` for the same case identifiers. The file is a JSON list of ``{"train": [...], "val": [...]}``
(nnU-Net's format; edit it by hand to choose your own folds).

With fewer than 5 cases there are not enough cases for 5 folds: we make ``n`` leave-one-out folds and say so;
fold ``"all"`` (train and validate on every case) is always available.

Creating the folds lives here; reading them (``load_splits``, ``fold_cases``, the fold-name parser) is the
contract in :mod:`autoseg.contracts.splits`, which training reads without importing planning.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from autoseg.contracts.splits import ALL_FOLD, SPLITS_FILE, load_splits
from autoseg.errors import ConfigurationError
from autoseg.fileio import write_json

logger = logging.getLogger(__name__)

NUM_FOLDS = 5  # design.md section 2
SPLIT_SEED = 12345  # nnU-Net's seed (design.md: "5 folds from a seeded KFold")


def make_splits(case_ids: Sequence[str], num_folds: int = NUM_FOLDS, seed: int = SPLIT_SEED) -> list[dict[str, list[str]]]:
    """Folds over ``case_ids``: ``num_folds`` folds, or leave-one-out when there are fewer cases than folds.

    Each case is in exactly one validation set; train = all other cases. Lists are sorted.
    """
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ConfigurationError("case identifiers are not unique; every case needs its own name")
    if not ids:
        raise ConfigurationError("no cases to split; the dataset has no training cases")
    if len(ids) == 1:
        return [{"train": list(ids), "val": list(ids)}]
    folds = min(num_folds, len(ids))
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)
    sizes = [len(ids) // folds + (1 if k < len(ids) % folds else 0) for k in range(folds)]
    splits, start = [], 0
    for size in sizes:
        val = {ids[i] for i in order[start:start + size]}
        start += size
        splits.append({"train": [c for c in ids if c not in val], "val": sorted(val)})
    return splits


def few_cases_message(num_cases: int, path: Path) -> str:
    return (
        f"{path}: only {num_cases} training case(s), fewer than the {NUM_FOLDS} folds expected; wrote "
        f"{num_cases} leave-one-out fold(s) instead (folds 0-{max(num_cases - 1, 0)}). Train with fold "
        f"'{ALL_FOLD}' to use every case, or add cases for proper 5-fold cross-validation"
    )


def create_splits(preprocessed_dir: str | os.PathLike, case_ids: Sequence[str]) -> list[dict[str, list[str]]]:
    """Write ``splits.json`` for ``case_ids`` unless it exists; return the splits in the file.

    An existing file is kept even when its cases differ from ``case_ids`` (a warning says so and how to
    regenerate it), so hand-edited folds survive re-planning.
    """
    path = Path(preprocessed_dir) / SPLITS_FILE
    if path.is_file():
        splits = load_splits(preprocessed_dir)
        existing = {c for fold in splits for c in fold["train"] + fold["val"]}
        if existing != set(case_ids):
            logger.warning(
                "%s: kept the existing splits although the dataset's cases changed (%d in the file, %d now); "
                "delete the file and re-run `autoseg plan` to make new folds", path, len(existing), len(case_ids)
            )
        else:
            logger.info("%s exists; kept it", path)
        return splits
    splits = make_splits(case_ids)
    if len(case_ids) < NUM_FOLDS:
        logger.warning(few_cases_message(len(case_ids), path))
    write_json(path, splits)
    return splits
