"""Benchmark: evaluate 100 synthetic 3D cases with 3 classes (Dice, IoU, HD95, NSD) on 2 workers.

Target (issue 8): under a minute on 2 CPU cores. Prints a table of wall times; the median of 3 runs counts.

    .venv/bin/python benchmarks/bench_evaluation.py [--cases 100] [--workers 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from autoseg.dataset.synthetic import SyntheticSpec, make_case
from autoseg.evaluation import evaluate_folders
from autoseg.io import write_segmentation


def build(folder: Path, cases: int) -> None:
    """References: the synthetic generator's default 3D cases (~24 x 48 x 48 voxels, labels 0-2) with a
    third class cut out of the object; predictions: each reference shifted by 1-2 voxels with a spurious blob."""
    spec = SyntheticSpec(num_cases=cases)
    rng = np.random.default_rng(0)
    for index in range(cases):
        _, label, geometry = make_case(spec, index)
        label = label.copy()
        object_voxels = np.argwhere(label == 1)
        label[tuple(object_voxels[object_voxels[:, 0] < np.median(object_voxels[:, 0])].T)] = 3
        prediction = np.roll(label, int(rng.integers(1, 3)), axis=2)
        prediction[:2, :3, :3] = 2
        write_segmentation(label, geometry, folder / "ref" / f"case_{index:03d}.nii.gz")
        write_segmentation(prediction, geometry, folder / "pred" / f"case_{index:03d}.nii.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        build(folder, args.cases)
        print(f"built {args.cases} cases in {time.perf_counter() - start:.1f} s")
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            summary = evaluate_folders(folder / "pred", folder / "ref", num_workers=args.workers)
            times.append(time.perf_counter() - start)
        assert summary.labels == [1, 2, 3] and summary.ok
    print(f"{'cases':>6} {'labels':>7} {'workers':>8} {'median s':>9} {'min s':>7} {'max s':>7} {'cases/s':>8}")
    median = statistics.median(times)
    print(f"{args.cases:>6} {3:>7} {args.workers:>8} {median:>9.2f} {min(times):>7.2f} {max(times):>7.2f} "
          f"{args.cases / median:>8.1f}")
    print(f"mean foreground Dice {summary.mean_foreground_dice:.3f}, HD95 {summary.foreground_mean['hd95']:.2f} mm")


if __name__ == "__main__":
    main()
