"""Preprocessing: crop to nonzero, normalise, resample to the target spacing, store; and the exact inverse.

Public functions (contracts in docs/internals.md, "Preprocessing"):

- :func:`preprocess_case` -- one image (+ label) in memory -> preprocessed arrays + ``CaseProperties``;
  the same path serves training cases and new images at prediction time.
- :func:`restore_probabilities`, :func:`restore_segmentation` -- preprocessed space -> original grid.
- :func:`preprocess_dataset` -> :class:`PreprocessReport` -- every training case, parallel and resumable.

Numerics live in ``cropping``, ``normalization`` and ``resampling``; the on-disk layout in ``store``.
"""
from autoseg.preprocessing.case import preprocess_case, restore_probabilities, restore_segmentation
from autoseg.preprocessing.dataset import PreprocessReport, preprocess_dataset
from autoseg.preprocessing.store import CaseProperties, is_complete, list_stored_cases, load_case, save_case

__all__ = [
    "CaseProperties",
    "PreprocessReport",
    "is_complete",
    "list_stored_cases",
    "load_case",
    "preprocess_case",
    "preprocess_dataset",
    "restore_probabilities",
    "restore_segmentation",
    "save_case",
]
