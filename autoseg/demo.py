"""`autoseg demo`: the whole pipeline on a small synthetic dataset, in minutes on a CPU.

Every stage is called through the same public functions the commands use, so a working demo is evidence that
the chain works end to end. Training runs a fixed number of iterations per fold (not a wall-clock budget), so
the demo reaches the same model, and the same Dice, on any machine: a loaded or slow CPU only takes longer.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from autoseg import paths
from autoseg.dataset.synthetic import SyntheticSpec, generate

log = logging.getLogger(__name__)

DEMO_DATASET = "Dataset999_Demo"
# Small anisotropic MRI-like volumes: big enough that the sliding window tiles them, small enough for a CPU.
DEMO_SPEC = SyntheticSpec(num_cases=10, num_test=3, dims=3, shape=(16, 40, 40), spacing=(2.5, 0.9, 0.9), seed=7)
# Iterations per fold: 20 epochs x 15. On this data the small "satellite" class is first found after about
# 135 iterations (pseudo-Dice 0 before, 0.8+ from ~150 on, 0.86 at 300), so 300 leaves a margin of 2x;
# fold 0 takes about 3-4 minutes on 2 CPU cores, longer on a loaded machine, never a worse model.
DEMO_EPOCHS = 20
DEMO_ITERATIONS_PER_EPOCH = 15


@dataclass
class DemoResult:
    ok: bool
    dice: dict[str, float] = field(default_factory=dict)
    mean_dice: float = float("nan")
    prediction_dir: Path | None = None


def _stage(number: int, title: str) -> float:
    print(f"\n[{number}/7] {title}", flush=True)
    return time.perf_counter()


def _done(start: float, what: str) -> None:
    print(f"      {what} ({time.perf_counter() - start:.1f} s)", flush=True)


def _fresh(location: paths.DatasetLocation, keep: bool) -> None:
    if keep:
        return
    for folder in (location.raw, location.preprocessed, location.results):
        if folder.exists():
            shutil.rmtree(folder)


def run_demo(root: str | None = None, quick: bool = False, device: str = "auto", keep: bool = False) -> DemoResult:
    """Generate the demo dataset and run verify -> plan -> preprocess -> train -> find-best -> predict -> evaluate.

    Returns the Dice reached on held-out test cases the model never saw.
    """
    from autoseg.dataset.verify import verify_dataset
    from autoseg.evaluation import evaluate_folders, find_best
    from autoseg.inference import predict
    from autoseg.pipeline import plan_dataset
    from autoseg.training import train

    data_root = paths.data_root(root)
    raw = paths.raw_root(data_root) / DEMO_DATASET
    location = paths.DatasetLocation(
        DEMO_DATASET, raw, paths.preprocessed_root(data_root) / DEMO_DATASET, paths.results_root(data_root) / DEMO_DATASET
    )
    _fresh(location, keep)
    folds = [0] if quick else [0, 1, 2, 3, 4]
    iterations = DEMO_EPOCHS * DEMO_ITERATIONS_PER_EPOCH
    print(f"autoseg demo: data root {data_root} ({'fold 0 only' if quick else '5 folds'}, {iterations} training "
          "iterations per fold)")

    start = _stage(1, "generate a synthetic dataset")
    if not (raw / "dataset.json").is_file():
        generate(raw, DEMO_SPEC)
    _done(start, f"{DEMO_SPEC.num_cases} training + {DEMO_SPEC.num_test} test cases in {raw}")

    start = _stage(2, "verify")
    report = verify_dataset(raw)
    if not report.ok:
        print(report.format())
        return DemoResult(ok=False)
    _done(start, "no problems found")

    start = _stage(3, "plan + preprocess")
    plans = plan_dataset(
        DEMO_DATASET, root=data_root, configurations=["3d_fullres"], architectures=["unet"], preprocess=True
    )
    config = plans.configuration("3d_fullres")
    _done(
        start,
        f"3d_fullres: spacing {['%.2f' % s for s in config.target_spacing]} mm, patch {config.patch_size}, "
        f"batch {config.batch_size}; plans in {location.preprocessed / 'plans.json'}",
    )

    start = _stage(4, f"train fold(s) {', '.join(map(str, folds))}")
    for fold in folds:
        fold_dir = train(
            DEMO_DATASET, "3d_fullres", fold, root=data_root, device=device, epochs=DEMO_EPOCHS,
            iterations_per_epoch=DEMO_ITERATIONS_PER_EPOCH, force=True,  # --keep reruns over the demo's own folds
        )
        print(f"      fold {fold}: {fold_dir}", flush=True)
    _done(start, "checkpoints, log.txt, progress.png and validation/ written per fold")

    start = _stage(5, "find-best (cross-validation, postprocessing, report)")
    find_best(DEMO_DATASET, root=data_root, folds=tuple(folds))
    _done(start, f"decisions in {location.results / 'find_best.json'}")

    start = _stage(6, "predict the held-out test cases")
    prediction_dir = data_root / "demo_predictions"
    predicted = predict(
        raw / "imagesTs", prediction_dir, dataset=DEMO_DATASET, configuration="3d_fullres", folds=folds,
        root=data_root, device=device,
    )
    if not predicted.ok:
        return DemoResult(ok=False, prediction_dir=prediction_dir)
    _done(start, f"segmentations in {prediction_dir}")

    start = _stage(7, "evaluate against the test labels")
    summary = evaluate_folders(prediction_dir, raw / "labelsTs")
    dice = {str(k): float(v["dice"]) for k, v in summary.mean.items() if str(k) not in ("0", "background")}
    mean_dice = sum(dice.values()) / max(len(dice), 1)
    _done(start, f"summary in {prediction_dir / 'summary.json'}")
    names = {str(v): k for k, v in plans.labels.items()}
    per_class = ", ".join(f"{names.get(k, k)} {v:.3f}" for k, v in dice.items())
    print(f"\nDemo finished: test Dice {per_class} (mean {mean_dice:.3f})")
    return DemoResult(ok=summary.ok, dice=dice, mean_dice=mean_dice, prediction_dir=prediction_dir)
