"""`autoseg ensemble`: average the saved probabilities of several prediction folders.

Each input folder holds ``<case>.npz`` files written by ``autoseg predict --save-probabilities`` (or a
training run's ``validation/``); see :mod:`autoseg.inference.outputs` for the format. The softmax
probabilities are averaged with equal weight per folder (nnU-Net's configuration ensemble), the argmax is
written with the geometry and file ending stored in the first folder's file.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from autoseg.errors import PredictionError
from autoseg.inference.outputs import read_probabilities, write_probabilities
from autoseg.inference.predictor import probabilities_to_segmentation
from autoseg.io import write_segmentation

log = logging.getLogger(__name__)


def _probability_cases(folder: Path) -> set[str]:
    return {p.name[: -len(".npz")] for p in folder.glob("*.npz") if not p.name.startswith(".")}


def common_cases(inputs: Sequence[Path]) -> list[str]:
    """The case identifiers every folder has probabilities for; a folder missing or differing raises
    PredictionError naming the folder and the cases it lacks or adds."""
    if len(inputs) < 2:
        raise PredictionError(f"ensembling needs at least two prediction folders, got {len(inputs)}")
    sets = []
    for folder in inputs:
        if not folder.is_dir():
            raise PredictionError(f"{folder}: prediction folder does not exist")
        cases = _probability_cases(folder)
        if not cases:
            raise PredictionError(
                f"{folder}: no <case>.npz probabilities found; predict with --save-probabilities first"
            )
        sets.append(cases)
    reference = sets[0]
    for folder, cases in zip(inputs[1:], sets[1:]):
        if cases != reference:
            missing, extra = sorted(reference - cases), sorted(cases - reference)
            detail = "; ".join(
                part for part in (
                    f"lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "",
                    f"has extra {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}" if extra else "",
                ) if part
            )
            raise PredictionError(
                f"{folder}: expected the same cases as {inputs[0]} ({len(reference)}), found {len(cases)} ({detail}); "
                "predict the same images into every folder"
            )
    return sorted(reference)


def ensemble_folders(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    save_probabilities: bool = False,
    postprocessing: Any | None = None,
) -> list[Path]:
    """Average ``<case>.npz`` probabilities over ``inputs`` and write ``<case><ending>`` segmentations (and,
    with ``save_probabilities``, the averaged ``<case>.npz``) into ``output``. Returns the written
    segmentation paths. ``postprocessing``: rules from ``autoseg.contracts.postprocessing`` to apply.
    """
    folders = [Path(p) for p in inputs]
    output = Path(output)
    cases = common_cases(folders)
    written = []
    for case_id in tqdm(cases, desc="ensemble", unit="case"):
        total, geometry, ending = read_probabilities(folders[0] / f"{case_id}.npz")
        for folder in folders[1:]:
            probabilities, other_geometry, _ = read_probabilities(folder / f"{case_id}.npz")
            if probabilities.shape != total.shape:
                raise PredictionError(
                    f"{folder / (case_id + '.npz')}: probabilities have shape {probabilities.shape}, "
                    f"{folders[0] / (case_id + '.npz')} has {total.shape}; ensemble predictions of the same "
                    "images and label set only"
                )
            problems = geometry.mismatch(other_geometry)
            if problems:
                log.warning("%s: geometry differs from %s (%s); using the first", folder, folders[0], "; ".join(problems))
            total += probabilities
        total /= len(folders)
        segmentation = probabilities_to_segmentation(total)
        if postprocessing is not None:
            from autoseg.contracts.postprocessing import apply_postprocessing

            segmentation = apply_postprocessing(segmentation, postprocessing)
        if save_probabilities:
            write_probabilities(output / f"{case_id}.npz", total, geometry, ending)
        target = output / f"{case_id}{ending}"
        write_segmentation(segmentation, geometry, target)
        written.append(target)
    log.info("ensembled %d case(s) of %d folders into %s", len(written), len(folders), output)
    return written
