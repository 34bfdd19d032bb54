"""After the last epoch: predict the fold's validation cases with the final checkpoint and score them.

Glue around inference (sliding window, restore to the original geometry) and evaluation; this is the
number nnU-Net reports per fold, and what find-best and the ensemble read (``validation/*.npz``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from autoseg.fileio import atomic_path
from autoseg.training.cascade import load_previous_stage
from autoseg.contracts.checkpoint import FINAL
from autoseg.training.job import FoldJob
from autoseg.training.schedule import format_duration


def final_validation(job: FoldJob, configuration, device: torch.device, mirror: bool,
                     previous_stage: Path | None = None) -> None:
    """Predict each validation case from the store with checkpoint_final.pt, write it in the original
    geometry with its probabilities (float16 .npz), and evaluate against raw labelsTr. A cascade's network also
    gets the previous stage's cross-validation prediction of the case."""
    from autoseg.inference import Predictor
    from autoseg.inference.predictor import foreground_one_hot
    from autoseg.io import write_segmentation
    from autoseg.preprocessing import restore_probabilities
    from autoseg.preprocessing.store import load_case

    plans, output = job.plans, job.output
    validation = output / "validation"
    validation.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_checkpoints([output / FINAL], device=device, mirror=mirror)
    label_values = np.array([v for _, v in sorted(plans.labels.items(), key=lambda kv: kv[1])])
    start = time.monotonic()
    for case_id in job.val_ids:
        data, _, properties = load_case(job.store, case_id)
        data = np.array(data, dtype=np.float32)
        if previous_stage is not None:
            previous = load_previous_stage(previous_stage, case_id)[0]
            data = np.concatenate([data, foreground_one_hot(previous, plans.num_classes)], axis=0)
        probabilities = predictor.predict_preprocessed(data)
        restored = restore_probabilities(probabilities, properties, configuration)
        segmentation = label_values[np.argmax(restored, axis=0)].astype(np.uint8)
        write_segmentation(segmentation, properties.geometry, validation / f"{case_id}{plans.file_ending}")
        with atomic_path(validation / f"{case_id}.npz", suffix=".npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, probabilities=restored.astype(np.float16))
    job.say(f"validation: {len(job.val_ids)} case(s) predicted in {format_duration(time.monotonic() - start)}"
            f"{'' if mirror else ' (mirroring off to fit the time budget)'}")
    reference = job.location.raw / "labelsTr"
    if not reference.is_dir():
        job.say(f"validation: {reference} not found; metrics skipped (run `autoseg evaluate` once labels are there)")
        return
    from autoseg.evaluation import evaluate_folders

    summary = evaluate_folders(validation, reference, file_ending=plans.file_ending, case_ids=job.val_ids)
    mean = getattr(summary, "mean", None)
    job.say(f"validation metrics: {json.dumps(mean, default=str)[:500]}")
