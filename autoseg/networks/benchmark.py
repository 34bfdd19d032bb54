"""Benchmark every registered architecture at a 3D and a 2D plan: ``python -m autoseg.networks.benchmark``.

Prints one Markdown table per plan: parameters, forward GFLOPs (2 per multiply-add, torch's FlopCounterMode),
the meta-device activation estimate the planner uses (fp16, batch 2), and the CPU forward time (median of 3,
batch 1, eval mode, no grad). With CUDA present it also measures an AMP training step (forward, backward,
SGD step; median of 5 after 2 warm-ups) and its peak memory.

The default plans are nnU-Net v2's plans for the synthetic SynthMR benchmark dataset
(Dataset970_SynthMR): 3d_fullres patch 44x56x48 and 2d patch 56x48. Each architecture gets the nearest patch it
accepts (``adjust_patch``), shown in the table.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Sequence

import torch

from autoseg.networks import NetworkSpec, adjust_patch, available, build, get
from autoseg.networks.summary import activation_bytes, count_parameters, estimate_flops

PLANS: dict[str, dict[str, Any]] = {
    "3d": dict(
        patch_size=(44, 56, 48),
        strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
        kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        features=[32, 64, 128, 256],
    ),
    "2d": dict(
        patch_size=(56, 48),
        strides=[[1, 1], [2, 2], [2, 2], [2, 2]],
        kernel_sizes=[[3, 3]] * 4,
        features=[32, 64, 128, 256],
    ),
}


def _median_seconds(fn: Any, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gpu_training_step(spec: NetworkSpec, batch: int) -> tuple[float, float]:
    device = torch.device("cuda")
    net = build(spec).to(device).train()
    optimiser = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(batch, spec.in_channels, *spec.patch_size, device=device)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            outputs = net(x)
            outputs = outputs if isinstance(outputs, list) else [outputs]
            loss = sum(o.float().pow(2).mean() for o in outputs)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        torch.cuda.synchronize()

    torch.cuda.reset_peak_memory_stats()
    seconds = _median_seconds(step, repeats=5, warmup=2)
    return seconds, torch.cuda.max_memory_allocated() / 2**30


def benchmark(dims_key: str, in_channels: int = 1, num_classes: int = 3, names: Sequence[str] | None = None) -> str:
    """The Markdown table for one plan ("3d" or "2d")."""
    base = PLANS[dims_key]
    dims = len(base["patch_size"])
    cuda = torch.cuda.is_available()
    header = "| arch | patch | params (M) | GFLOPs fwd | activations fp16 b2 (GB) | CPU fwd b1 (s) |"
    rule = "|---|---|---|---|---|---|"
    if cuda:
        header += " GPU AMP train step b2 (s) | GPU peak (GiB) |"
        rule += "---|---|"
    rows = [f"### {dims_key} plan (SynthMR-like: patch {base['patch_size']}, strides {base['strides']})", "",
            header, rule]
    for name in names or available():
        if dims not in get(name).dims:
            continue
        patch = adjust_patch(name, base["patch_size"], base["strides"], dims)
        spec = NetworkSpec(name, in_channels, num_classes, **dict(base, patch_size=patch))
        with torch.device("meta"):
            meta_net = build(spec)
        params = count_parameters(meta_net)
        flops = estimate_flops(meta_net, (1, in_channels, *patch))
        memory = activation_bytes(spec, batch_size=2)
        net = build(spec).eval()
        x = torch.randn(1, in_channels, *patch)
        with torch.no_grad():
            seconds = _median_seconds(lambda: net(x), repeats=3)
        row = (f"| {name} | {'x'.join(map(str, patch))} | {params / 1e6:.2f} | {flops / 1e9:.1f} | "
               f"{memory / 1e9:.2f} | {seconds:.2f} |")
        if cuda:
            step, peak = _gpu_training_step(spec, batch=2)
            row += f" {step:.3f} | {peak:.2f} |"
        rows.append(row)
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", choices=["3d", "2d", "both"], default="both")
    parser.add_argument("--arch", nargs="*", help="architectures (default: all registered)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for key in (["3d", "2d"] if args.dims == "both" else [args.dims]):
        print(benchmark(key, names=args.arch))  # noqa: T201 - this is a command-line report
        print()  # noqa: T201


if __name__ == "__main__":
    main()
