"""Builders of tiny synthetic data for the evaluation tests: a raw dataset plus fake fold validation outputs
(segmentations, npz probabilities, training logs) of several configurations, as training would leave them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from autoseg.dataset.synthetic import SyntheticSpec, generate
from autoseg.io import read_segmentation, write_segmentation

DATASET = "Dataset999_Synth"
NUM_CLASSES = 3  # background, object, satellite (autoseg.dataset.synthetic.LABELS)


def make_raw(root: Path, num_cases: int = 10, seed: int = 0) -> Path:
    raw = root / "raw" / DATASET
    generate(raw, SyntheticSpec(num_cases=num_cases, shape=(10, 20, 20), spacing=(2.0, 1.0, 1.0), seed=seed))
    return raw


def noisy_probabilities(label: np.ndarray, noise: float, seed: int, blob: bool) -> np.ndarray:
    """Softmax of a one-hot label plus smooth noise: errors sit at object boundaries like a real network's.
    ``blob``: a confident false-positive object-1 cube in a far corner (a look-alike structure)."""
    rng = np.random.default_rng(seed)
    logits = np.stack([(label == k).astype(np.float32) * 4.0 for k in range(NUM_CLASSES)])
    for k in range(NUM_CLASSES):
        smooth = gaussian_filter(rng.normal(0, 1, label.shape), 1.0)
        logits[k] += smooth / smooth.std() * noise * 4.0  # noise 0.5: std half the one-hot logit gap
    if blob:
        logits[1, :3, :3, :3] = 20.0
    exp = np.exp(logits - logits.max(axis=0, keepdims=True))
    return exp / exp.sum(axis=0, keepdims=True)


def make_fold_outputs(
    root: Path,
    configuration: str,
    noise: float,
    folds: tuple[int, ...] = (0, 1, 2, 3, 4),
    blob: bool = True,
    seed: int = 0,
) -> Path:
    """results/<D>/<configuration>/fold_k/{validation/<case>.nii.gz + .npz, training_log.json} for the val
    cases of preprocessed/<D>/splits.json."""
    splits = json.loads((root / "preprocessed" / DATASET / "splits.json").read_text())
    raw = root / "raw" / DATASET
    for fold in folds:
        folder = root / "results" / DATASET / configuration / f"fold_{fold}"
        validation = folder / "validation"
        validation.mkdir(parents=True, exist_ok=True)
        for index, case_id in enumerate(splits[fold]["val"]):
            label, geometry = read_segmentation(raw / "labelsTr" / f"{case_id}.nii.gz")
            probabilities = noisy_probabilities(label, noise, seed * 1000 + fold * 100 + index, blob)
            write_segmentation(probabilities.argmax(0).astype(np.uint8), geometry, validation / f"{case_id}.nii.gz")
            np.savez_compressed(validation / f"{case_id}.npz", probabilities=probabilities.astype(np.float16))
        epochs = list(range(5))
        log = {
            "epochs": epochs,
            "train_loss": [1.0 - 0.1 * e for e in epochs],
            "val_loss": [1.1 - 0.1 * e for e in epochs],
            "pseudo_dice": [[0.5 + 0.05 * e, 0.4 + 0.05 * e] for e in epochs],
            "lr": [0.01 * (1 - e / 5) ** 0.9 for e in epochs],
            "epoch_time": [1.0 for _ in epochs],
        }
        (folder / "training_log.json").write_text(json.dumps(log))
    return root / "results" / DATASET / configuration


def make_project(root: Path, configurations: dict[str, float], num_cases: int = 10, folds=(0, 1, 2, 3, 4)) -> Path:
    """A raw dataset, 5-fold splits and fold outputs for each ``{configuration folder: noise}``."""
    make_raw(root, num_cases)
    cases = [f"case_{i:03d}" for i in range(num_cases)]
    splits = [{"train": [c for c in cases if c not in cases[k::5]], "val": cases[k::5]} for k in range(5)]
    preprocessed = root / "preprocessed" / DATASET
    preprocessed.mkdir(parents=True, exist_ok=True)
    (preprocessed / "splits.json").write_text(json.dumps(splits))
    for seed, (configuration, noise) in enumerate(configurations.items()):
        make_fold_outputs(root, configuration, noise, folds=folds, seed=seed + 1)
    return root
