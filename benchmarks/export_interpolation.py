"""Ablation: bringing probabilities back to the original grid as log-probabilities (what autoseg does) or as
probabilities, scored with the same trained weights.

For each fold given, the fold's validation cases (splits.json) and, with ``--test``, the labelled imagesTs
cases are predicted once on the preprocessed grid (sliding window, mirroring, the predictor's defaults); the
two restorations (``restore_probabilities(..., log_space=True/False)``) differ only in the interpolation, so
the difference is that of the interpolation alone. Prints the mean Dice per class of both and the difference,
per fold and set, as a markdown table. Cases whose preprocessed grid equals their original grid give equal
numbers (nothing is interpolated).

``--timing Z Y X`` instead times the two interpolations alone (median of ``--repeats``, alternating) on random
3-class probabilities of that preprocessed shape brought to 1.5x its size per axis: what the log space costs.

    .venv/bin/python benchmarks/export_interpolation.py Dataset970_SynthMR 3d_fullres --folds 0 1 2 \
        --root /tmp/acc3 --test
    .venv/bin/python benchmarks/export_interpolation.py --timing 128 256 256
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks, as the evaluator computes it (1 when both are empty)."""
    from autoseg.evaluation.metrics import confusion_counts, reported_dice

    tp, fp, fn, _ = confusion_counts(reference, prediction)
    return reported_dice(tp, fp, fn)


def score_case(predictor, image_files: Sequence[Path], label_file: Path) -> dict[str, list[float]]:
    """Per-class Dice ``{"log": [...], "linear": [...]}`` of one case, one prediction restored both ways."""
    from autoseg.io import read_image, read_segmentation
    from autoseg.preprocessing import restore_probabilities

    image, geometry = read_image(image_files)
    reference, _ = read_segmentation(label_file)
    data, properties = predictor.preprocess(image, geometry)
    probabilities = predictor.predict_preprocessed(data)
    scores = {}
    for name, log_space in (("log", True), ("linear", False)):
        restored = restore_probabilities(probabilities, properties, predictor.configuration, log_space=log_space)
        segmentation = restored.argmax(axis=0)
        scores[name] = [dice(segmentation == k, reference == k) for k in range(1, predictor.num_classes)]
    return scores


def time_interpolations(shape: Sequence[int], repeats: int) -> None:
    """Seconds per restore of ``[3, *shape]`` probabilities to 1.5x the shape, log space against linear."""
    from autoseg.preprocessing.resampling import resample_channels, resample_probabilities

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (3, *shape)).astype(np.float32)
    probabilities = np.exp(logits - logits.max(axis=0))
    probabilities /= probabilities.sum(axis=0)
    del logits
    new_shape = tuple(int(round(n * 1.5)) for n in shape)
    times: dict[str, list[float]] = {"probabilities": [], "log-probabilities": []}
    for _ in range(repeats):
        for name, function in (("probabilities", resample_channels), ("log-probabilities", resample_probabilities)):
            start = time.perf_counter()
            function(probabilities, new_shape, 1)
            times[name].append(time.perf_counter() - start)
    linear = statistics.median(times["probabilities"])
    print(f"restore [3, {' x '.join(map(str, shape))}] -> [3, {' x '.join(map(str, new_shape))}], order 1, "
          f"median of {repeats}\n")
    print("| interpolated as | s | ratio |")
    print("|:---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / linear:.2f} |")


def main(argv: Sequence[str] | None = None) -> int:
    from autoseg.cli import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("dataset", nargs="?", help="trained dataset under --root (folder name, number or name)")
    parser.add_argument("configuration", nargs="?", help="trained configuration, e.g. 3d_fullres")
    parser.add_argument("--folds", nargs="+", default=["0"], help="trained folds to score")
    parser.add_argument("--root", default=None, help="data root (default: $AUTOSEG_HOME, else ./autoseg_data)")
    parser.add_argument("--arch", default=None, help="architecture (default: the configuration's)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pt", help="checkpoint file in each fold")
    parser.add_argument("--test", action="store_true", help="also score imagesTs against labelsTs with each fold")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--timing", nargs=3, type=int, metavar=("Z", "Y", "X"), default=None,
                        help="time the two interpolations on random probabilities of this shape instead")
    parser.add_argument("--repeats", type=int, default=3, help="--timing: repeats per interpolation")
    args = parser.parse_args(argv)
    if args.timing:
        time_interpolations(args.timing, args.repeats)
        return 0
    if not (args.dataset and args.configuration):
        parser.error("give DATASET and CONFIGURATION (or --timing Z Y X)")

    from autoseg.dataset import load_dataset_spec
    from autoseg.dataset.cases import IMAGES_TEST, list_image_cases, list_training_cases
    from autoseg.inference.predictor import Predictor, model_folder
    from autoseg.paths import resolve_dataset
    from autoseg.contracts.splits import fold_cases

    location = resolve_dataset(args.dataset, args.root)
    spec = load_dataset_spec(location.raw)
    training = {case.case_id: case for case in list_training_cases(location.raw, spec)}
    test_labels = location.raw / "labelsTs"
    test = [c for c in list_image_cases(location.raw / IMAGES_TEST, spec.file_ending)
            if (test_labels / f"{c.case_id}{spec.file_ending}").is_file()] if args.test else []
    folder = model_folder(location.name, args.configuration, args.root, args.arch)
    labels = {int(v): k for k, v in spec.labels.items() if int(v) != 0}

    rows = []
    for fold in args.folds:
        predictor = Predictor.from_checkpoints([folder / f"fold_{fold}" / args.checkpoint], device=args.device)
        _, validation = fold_cases(location.preprocessed, fold)
        sets = {"validation": [(training[c].image_files, training[c].label_file) for c in validation]}
        if test:
            sets["test"] = [(c.image_files, test_labels / f"{c.case_id}{spec.file_ending}") for c in test]
        for set_name, cases in sets.items():
            per_case = [score_case(predictor, images, label) for images, label in cases]
            log_mean = np.mean([s["log"] for s in per_case], axis=0)
            linear_mean = np.mean([s["linear"] for s in per_case], axis=0)
            for index, (a, b) in enumerate(zip(log_mean, linear_mean)):
                rows.append((fold, set_name, len(cases), f"{index + 1} {labels.get(index + 1, '')}".strip(), a, b))
            print(f"fold {fold} {set_name}: {len(cases)} cases", file=sys.stderr, flush=True)

    print(f"{location.name} {args.configuration} ({folder.name}), {args.checkpoint}\n")
    print("| fold | set | cases | class | Dice log-probabilities | Dice probabilities | Δ |")
    print("|---|---|---:|:---|---:|---:|---:|")
    for fold, set_name, count, label, a, b in rows:
        print(f"| {fold} | {set_name} | {count} | {label} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
