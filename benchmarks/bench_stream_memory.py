"""Peak RSS of predicting one big many-class volume: whole-volume accumulator (before) vs band streaming (after).

Each variant runs in a fresh subprocess, which reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (its peak
resident memory, torch included) after: network-grid log-probabilities, then the slab-by-slab restore to a
label map (identity geometry: no crop, no resampling). A tiny random U-Net (features 4, 8, 16), mirroring off,
one fold, on the CPU: speed is not the point.

    PYTHONPATH=. python benchmarks/bench_stream_memory.py --shape 128 512 512 --classes 50
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def _child(variant: str, shape: list[int], classes: int, patch: list[int], spill: str) -> None:
    import numpy as np
    import torch

    from autoseg.inference import Predictor
    from autoseg.inference.sliding_window import sliding_window_predict
    from autoseg.io import Geometry
    from autoseg.preprocessing.store import CaseProperties
    from tests.inference.conftest import build_tiny_network, make_plans

    torch.set_num_threads(2)
    plans = make_plans(3, patch=tuple(patch), spacing=(1.0, 1.0, 1.0))
    plans.labels = {"background": 0, **{f"organ{k}": k for k in range(1, classes)}}
    configuration = plans.configurations["3d_fullres"]
    predictor = Predictor([build_tiny_network(plans)], plans, configuration, 1, device="cpu", mirror=False)
    predictor.spill_directory = spill
    data = np.random.default_rng(0).uniform(1.0, 2.0, (1, *shape)).astype(np.float32)
    geometry = Geometry(tuple(shape), (1.0, 1.0, 1.0), (0.0,) * 3, tuple(np.eye(3).ravel()))
    properties = CaseProperties(
        case_id="big", geometry=geometry, original_spacing=[1.0] * 3, shape_before_crop=list(shape),
        bbox=[[0, s] for s in shape], shape_after_crop=list(shape), spacing_after_resampling=[1.0] * 3,
        shape_after_resampling=list(shape),
    )
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "before":  # what Predictor.predict_log_probabilities did for one fold before streaming
        with torch.inference_mode():
            log_probabilities = sliding_window_predict(
                predictor.networks[0], torch.from_numpy(data), configuration.patch_size, 3, classes, mirror=False,
                batch_size=predictor.window_batch_size, log_softmax=True)
    else:
        log_probabilities = predictor.predict_log_probabilities(data)
    network_seconds = time.perf_counter() - start
    segmentation = predictor.restore_segmentation(log_probabilities, properties)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"variant": variant, "peak_rss_gib": peak / 2**20, "rss_before_prediction_gib": baseline / 2**20,
                      "network_seconds": round(network_seconds, 1), "total_seconds": round(time.perf_counter() - start, 1),
                      "result": type(log_probabilities).__name__, "labels": int(len(np.unique(segmentation[::8])))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 512, 512])
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 128, 128])
    parser.add_argument("--variants", nargs="+", default=["after", "before"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as spill:
            _child(args.child, args.shape, args.classes, args.patch, spill)
        return
    for variant in args.variants:
        command = [sys.executable, __file__, "--child", variant, "--shape", *map(str, args.shape),
                   "--classes", str(args.classes), "--patch", *map(str, args.patch)]
        print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
