"""What should a small CPU time budget buy? (issue 11 item 4; evidence in benchmarks/results/budget_study.md)

Two measurements, both on a dataset that is already planned and preprocessed (`autoseg plan D`):

``step``: seconds per training iteration (forward, Dice+CE with deep supervision, backward, gradient clipping,
SGD step: the trainer's own ``_train_step``) for variants of the plan's 3d_fullres configuration: network
width (features scaled as a whole, caps included), depth (stages kept), batch size, bf16 autocast on CPU,
channels_last_3d memory format, torch thread count. Random input/labels of the plan's patch shape (the step
time does not depend on the values). Variants are interleaved round by round (A B C .. A B C ..) because the
machine is shared; per variant the median over rounds of the mean time of ``--iters`` iterations.

``train``: short budget-limited trainings (fold 0, `autoseg.training.train(..., time_budget=...)`) of the
given variants, one after the other in alternating order, reporting the fold-0 validation Dice from
``validation/summary.json`` and the iterations done. Variants are applied by ``--variant`` names understood by
:func:`variant_configuration`; ``auto`` means whatever ``adapt_to_budget`` chooses (the shipped behaviour),
``plan`` the unadapted plan.

    .venv/bin/python benchmarks/budget_study.py step Dataset004_Hippocampus --root /tmp/root
    .venv/bin/python benchmarks/budget_study.py train Dataset004_Hippocampus --root /tmp/root --budget 3m \
        --variant plan --variant auto
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from autoseg.contracts.plans import PLANS_FILE, load_plans
from autoseg.paths import resolve_dataset
from autoseg.training import budget as budget_module
from autoseg.training.loop import train_step
from autoseg.training.losses import LossContext, build_loss
from autoseg.training.parts import StepParts, build_network, random_batch


def variant_configuration(config, name: str):
    """(configuration, settings) for a variant name like ``w0.5``, ``w0.5+bf16``, ``s3``, ``b1``, ``t1``,
    ``cl`` (channels_last_3d); ``base`` = the plan. Settings: threads, dtype, channels_last."""
    settings = {"threads": None, "dtype": None, "channels_last": False}
    config = copy.deepcopy(config)
    for part in name.split("+"):
        if part in ("base", "plan"):
            continue
        if part == "bf16":
            settings["dtype"] = torch.bfloat16
        elif part == "cl":
            settings["channels_last"] = True
        elif part.startswith("w"):
            config = budget_module.with_width(config, float(part[1:]))
        elif part.startswith("s"):
            config = budget_module.with_stages(config, int(part[1:]))
        elif part.startswith("b"):
            config.batch_size = int(part[1:])
        elif part.startswith("t"):
            settings["threads"] = int(part[1:])
        else:
            raise SystemExit(f"unknown variant part {part!r} in {name!r}")
    return config, settings


def _random_batch(network, config, num_classes):
    shape = (config.batch_size, 1, *config.patch_size)
    scales = list(getattr(network, "ds_scales", [(1.0,) * config.dims]))
    targets = []
    for scale in scales:
        size = [max(1, round(p * s)) for p, s in zip(config.patch_size, scale)]
        targets.append(torch.randint(0, num_classes, (config.batch_size, 1, *size)).float())
    return {"data": torch.randn(shape), "target": targets, "keys": []}


def step_study(plans, base_config, variants, iters, rounds, default_threads):
    prepared = {}
    for name in variants:
        config, settings = variant_configuration(base_config, name)
        torch.manual_seed(0)
        network = build_network(plans, config)
        if settings["channels_last"]:
            network = network.to(memory_format=torch.channels_last_3d)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
        batch = random_batch(network, config, plans.network_in_channels(config), plans.num_classes, config.batch_size)
        if settings["channels_last"]:
            batch["data"] = batch["data"].contiguous(memory_format=torch.channels_last_3d)
        weights = list(network.ds_weights)
        params = sum(p.numel() for p in network.parameters())
        prepared[name] = (config, settings, network, optimizer, batch, weights, params)
    times = {name: [] for name in variants}
    for round_index in range(rounds + 1):  # round 0 warms up (allocator, oneDNN primitive cache)
        for name in variants:
            config, settings, network, optimizer, batch, weights, _ = prepared[name]
            torch.set_num_threads(settings["threads"] or default_threads)
            network.train()
            n = 2 if round_index == 0 else iters
            start = time.perf_counter()
            for i in range(n):
                parts = StepParts(network, optimizer, build_loss("dice_ce", LossContext(3, plans.num_classes, False)),
                                  weights, settings["dtype"])
                train_step(parts, batch, torch.device("cpu"), 0, i, Path("."))
            if round_index:
                times[name].append((time.perf_counter() - start) / n)
    torch.set_num_threads(default_threads)
    rows = []
    base = statistics.median(times[variants[0]])
    for name in variants:
        config, _, _, _, _, _, params = prepared[name]
        median = statistics.median(times[name])
        voxels = config.batch_size * int(torch.tensor(config.patch_size).prod())
        rows.append({"variant": name, "features": config.architecture.features, "batch": config.batch_size,
                     "patch": config.patch_size, "params_M": round(params / 1e6, 3), "s_per_iter": round(median, 4),
                     "ratio_to_first": round(base / median, 2), "voxels_per_s": round(voxels / median),
                     "all_s": [round(t, 4) for t in times[name]]})
    return rows


def train_study(dataset, root, variants, budget, fold, rounds, work_tag):
    from autoseg.training import train
    from autoseg.training import parts as trainer_module

    location = resolve_dataset(dataset, root)
    results = {name: [] for name in variants}
    original_adapt = trainer_module.adapt_to_budget
    for round_index in range(rounds):
        order = variants if round_index % 2 == 0 else list(reversed(variants))
        for name in order:
            if name == "auto":
                trainer_module.adapt_to_budget = original_adapt
            else:
                def forced(configuration, budget_seconds, device, _name=name, **kwargs):
                    # a fixed variant, not measured at start (measuring batch 7 at full width would eat
                    # the budget); 20 iterations per epoch for every forced variant
                    config, settings = variant_configuration(configuration, _name)
                    choice = budget_module.BudgetChoice(
                        autocast="bfloat16" if settings["dtype"] is torch.bfloat16 else None,
                        num_threads=settings["threads"], iterations_per_epoch=20)
                    return config, [f"study variant {_name}"], choice

                trainer_module.adapt_to_budget = forced
            start = time.perf_counter()
            # each variant retrains the same fold: start over instead of being refused as already trained
            folder = train(dataset, "3d_fullres", fold, root=root, time_budget=budget, device="cpu", force=True)
            wall = time.perf_counter() - start
            summary = json.loads((folder / "validation" / "summary.json").read_text())
            timing = json.loads((folder / "timing.json").read_text())
            curves = json.loads((folder / "training_log.json").read_text())
            dice = {k: round(float(v["dice"]), 4) for k, v in summary["mean"].items() if k not in ("0", "background")}
            meta = torch.load(folder / "checkpoint_final.pt", weights_only=True, map_location="cpu")["metadata"]
            results[name].append({"dice": dice, "wall_s": round(wall, 1), "elapsed_s": round(timing["elapsed_s"], 1),
                                  "epochs": len(curves["epochs"]), "iterations": meta.get("iterations_done"),
                                  "features": meta["configuration"]["architecture"]["features"],
                                  "batch": meta["configuration"]["batch_size"]})
            print(json.dumps({"variant": name, **results[name][-1]}), flush=True)
            kept = folder.parent / f"{folder.name}_{work_tag}_{name}_{round_index}"
            if kept.exists():
                shutil.rmtree(kept)
            folder.rename(kept)
    trainer_module.adapt_to_budget = original_adapt
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["step", "train"])
    parser.add_argument("dataset")
    parser.add_argument("--root", required=True)
    parser.add_argument("--variant", action="append", help="repeatable; first is the reference")
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", default="3m")
    parser.add_argument("--fold", default="0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="study")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    location = resolve_dataset(args.dataset, args.root)
    plans = load_plans(location.preprocessed / PLANS_FILE)
    config = plans.configuration("3d_fullres")
    if args.mode == "step":
        variants = args.variant or ["base", "w0.5", "w0.25", "bf16", "cl", "t1", "s3", "b1"]
        rows = step_study(plans, config, variants, args.iters, args.rounds, args.threads)
        print(f"{location.name} 3d_fullres patch {config.patch_size} batch {config.batch_size}, "
              f"{args.iters} iterations x {args.rounds} rounds, median; torch {torch.__version__}")
        print("| variant | features | batch | params (M) | s/iter | speed-up vs first | voxels/s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['features']} | {r['batch']} | {r['params_M']} | {r['s_per_iter']:.3f} | "
                  f"{r['ratio_to_first']:.2f}x | {r['voxels_per_s']} |")
    else:
        rows = train_study(args.dataset, args.root, args.variant or ["plan", "auto"], args.budget, args.fold,
                           args.rounds, args.tag)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
