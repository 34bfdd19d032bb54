"""Inference speed: seconds per case and peak RSS of the sliding window at the SynthMR 3d_fullres plan.

Usage::

    python benchmarks/bench_inference.py [--repeats 3] [--cases 2] [--device cpu] [--no-mirror]
                                         [--nnunet-venv PATH]

Both sides run the same work: a plain U-Net with the topology nnU-Net v2 planned for Dataset970_SynthMR
(shared/reference/oracle/Dataset970_SynthMR/nnUNetPlans.json: patch [44, 56, 48], features 32-256, random
weights: timing only), step 0.5, Gaussian weighting, mirroring over all axes, on random float32 images of a
fixed size (default: twice the median image along each in-plane axis, so several windows overlap). Each
measurement runs in a fresh subprocess so the peak RSS (ru_maxrss of the child) belongs to that run alone.
The table gives the median over ``--repeats`` runs of seconds per case.

The nnU-Net side plugs in through ``--nnunet-venv``: a virtual environment with nnunetv2 installed
(shared/bench/setup_nnunet.sh); :data:`NNUNET_SNIPPET` drives its predictor's sliding window on the same
network and image sizes. Without the option only autoseg's side is measured.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# SynthMR 3d_fullres plan as nnU-Net v2 2.8.1 wrote it (oracle file above); used when the file is absent
PLAN = {
    "patch_size": [44, 56, 48],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "features": [32, 64, 128, 256],
    "num_classes": 3,
    "in_channels": 1,
}
DEFAULT_IMAGE = [44, 106, 96]  # median image (40.5, 53, 47.5) rounded up to the patch's Z, doubled in-plane

AUTOSEG_SNIPPET = r"""
import json, resource, sys, time, torch
from autoseg import networks
from autoseg.device import choose_device, configure_threads, inference_amp_dtype
from autoseg.inference.sliding_window import sliding_window_predict
cfg = json.loads(sys.argv[1]); configure_threads()
device = choose_device(cfg["device"])
net = networks.build(networks.NetworkSpec("unet", cfg["in_channels"], cfg["num_classes"], cfg["patch_size"],
                                         cfg["strides"], cfg["kernel_sizes"], cfg["features"],
                                         deep_supervision=False)).to(device).eval()
torch.manual_seed(0)
times = []
with torch.inference_mode():
    for case in range(cfg["cases"]):
        data = torch.randn(cfg["in_channels"], *cfg["image"])
        start = time.perf_counter()
        out = sliding_window_predict(net, data, cfg["patch_size"], 3, cfg["num_classes"], step_size=0.5,
                                     mirror=cfg["mirror"], device=device, amp=inference_amp_dtype(device), softmax=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
print(json.dumps({"seconds": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# nnU-Net v2 side (run with the interpreter of --nnunet-venv): same network class nnU-Net uses
# (dynamic_network_architectures PlainConvUNet), its predictor's sliding window with the same options.
NNUNET_SNIPPET = r"""
import json, resource, sys, time, torch
from torch import nn
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
cfg = json.loads(sys.argv[1])
device = torch.device("cuda" if cfg["device"] in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
torch.set_num_threads(torch.get_num_threads())
conv = nn.Conv3d
net = PlainConvUNet(cfg["in_channels"], len(cfg["features"]), cfg["features"], conv, cfg["kernel_sizes"],
                    cfg["strides"], [2] * len(cfg["features"]), cfg["num_classes"], [2] * (len(cfg["features"]) - 1),
                    conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                    nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False).to(device).eval()
predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=cfg["mirror"],
                            perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                            allow_tqdm=False)
predictor.network = net
predictor.list_of_parameters = [net.state_dict()]
predictor.allowed_mirroring_axes = (0, 1, 2)
class _Cfg: patch_size = cfg["patch_size"]
predictor.configuration_manager = _Cfg()
class _Labels: num_segmentation_heads = cfg["num_classes"]
predictor.label_manager = _Labels()
torch.manual_seed(0)
times = []
with torch.inference_mode():
    for case in range(cfg["cases"]):
        data = torch.randn(cfg["in_channels"], *cfg["image"])
        start = time.perf_counter()
        logits = predictor.predict_sliding_window_return_logits(data)
        torch.softmax(logits.float(), 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
print(json.dumps({"seconds": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def load_plan() -> dict:
    """The oracle plan when the shared reference is present, else the copy above."""
    oracle = Path(__file__).resolve().parents[2] / "shared/reference/oracle/Dataset970_SynthMR/nnUNetPlans.json"
    if not oracle.is_file():
        return dict(PLAN)
    configuration = json.loads(oracle.read_text())["configurations"]["3d_fullres"]
    kwargs = configuration["architecture"]["arch_kwargs"]
    return {**PLAN, "patch_size": configuration["patch_size"], "strides": kwargs["strides"],
            "kernel_sizes": kwargs["kernel_sizes"], "features": kwargs["features_per_stage"]}


def run_side(python: str, snippet: str, config: dict) -> dict:
    """One fresh process: returns {"seconds": [per case], "peak_rss_mb": float}."""
    result = subprocess.run([python, "-c", snippet, json.dumps(config)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"benchmark run failed ({python}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(sides: dict[str, tuple[str, str]], config: dict, repeats: int) -> list[tuple[str, float, float]]:
    """``(name, median seconds per case, largest peak RSS MB)`` per side over ``repeats`` fresh processes each.
    Sides alternate round by round (A B A B ...), so load from other work on the machine hits both alike."""
    per_case: dict[str, list[float]] = {name: [] for name in sides}
    rss: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, (python, snippet) in sides.items():
            run = run_side(python, snippet, config)
            per_case[name].append(statistics.median(run["seconds"]))
            rss[name].append(run["peak_rss_mb"])
    return [(name, statistics.median(per_case[name]), max(rss[name])) for name in sides]


def main(argv: list[str] | None = None) -> int:
    from autoseg.cli import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="rounds, alternating the two tools; the median counts")
    parser.add_argument("--cases", type=int, default=2, help="cases per process (the first warms up caches)")
    parser.add_argument("--image", type=int, nargs=3, default=DEFAULT_IMAGE, help="image size Z Y X")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for both tools")
    parser.add_argument("--no-mirror", action="store_true", help="predict without test-time mirroring")
    parser.add_argument("--nnunet-venv", default=None,
                        help="virtual environment with nnunetv2 installed (without it: autoseg only)")
    args = parser.parse_args(argv)
    config = {**load_plan(), "image": args.image, "device": args.device, "mirror": not args.no_mirror,
              "cases": args.cases}
    sides = {"autoseg": (sys.executable, AUTOSEG_SNIPPET)}
    if args.nnunet_venv:
        sides["nnU-Net v2"] = (str(Path(args.nnunet_venv) / "bin" / "python"), NNUNET_SNIPPET)
    rows = measure(sides, config, args.repeats)
    print(f"patch {config['patch_size']}, image {config['image']}, step 0.5, mirror {config['mirror']}, "
          f"device {args.device}, median of {args.repeats}")
    print(f"{'side':<12} {'s/case':>8} {'peak RSS MB':>12}")
    for name, seconds, rss in rows:
        print(f"{name:<12} {seconds:>8.2f} {rss:>12.0f}")
    if len(rows) == 2:
        print(f"speed-up autoseg vs nnU-Net: {rows[1][1] / rows[0][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
