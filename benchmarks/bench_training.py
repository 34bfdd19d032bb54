"""Training throughput, autoseg beside nnU-Net v2 (issue 6 "Must show"); table -> benchmarks/results/training.md.

Data: Dataset970_SynthMR regenerated from shared/reference/oracle/Dataset970_SynthMR/recipe.txt
(``python ../shared/bench/make_synthetic.py OUT/Dataset970_SynthMR -n 20 --seed 0``), planned and preprocessed
by each tool (``autoseg plan``; ``nnUNetv2_plan_and_preprocess -c 3d_fullres``) under ``--work``; an existing
``--work`` is reused.

1. Training step (forward, Dice+CE loss with deep supervision, backward, gradient clipping at 12, SGD step) at
   nnU-Net's 3d_fullres plan of that dataset (its network, patch and batch): nnU-Net's own network built from its
   plans with its public ``get_network_from_plans`` and its own loss classes (``DC_and_CE_loss`` in
   ``DeepSupervisionWrapper``), run in its venv; ours is our ``unet`` with the same features/kernels/strides,
   patch and batch, through the trainer's own ``loop.train_step``. Random data (the time does not depend on values).
   Each side runs in its own process (2 warm-up steps, then ``--steps`` timed steps, median), sides alternate
   A B A B for ``--rounds`` rounds; the table gives the median over rounds and the ratio.
   Our variants: fp32 with the default threads (as nnU-Net: torch's default on CPU), and bf16 autocast (what
   ``--time-budget`` switches on for CPUs with native bf16).
2. Data pipeline: batches/s of the augmented training loader with 2 worker processes, ours (``BatchLoader``)
   and nnU-Net's (``nnUNetTrainer.get_dataloaders()`` with ``nnUNet_n_proc_DA=2``), same dataset, same plan,
   alternating processes; ``--batches`` batches after the first 4 (worker start-up excluded).

    .venv/bin/python benchmarks/bench_training.py --work /tmp/bench_train [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATASET = "Dataset970_SynthMR"

NNUNET_STEP = r"""
import json, sys, time, torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
import numpy as np
plans_file, num_classes, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
manager = PlansManager(plans_file)
config = manager.get_configuration("3d_fullres")
network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                 config.network_arch_init_kwargs_req_import, 1, num_classes, deep_supervision=True)
network.train()
optimizer = torch.optim.SGD(network.parameters(), 0.01, weight_decay=3e-5, momentum=0.99, nesterov=True)
loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                      weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
pools = config.pool_op_kernel_sizes
scales = list(list(i) for i in 1 / np.cumprod(np.vstack(pools), axis=0))[:-1]
weights = np.array([1 / (2 ** i) for i in range(len(scales))]); weights[-1] = 0; weights = weights / weights.sum()
loss = DeepSupervisionWrapper(loss, weights)
patch, batch = config.patch_size, config.batch_size
torch.manual_seed(0)
data = torch.randn(batch, 1, *patch)
targets = [torch.randint(0, num_classes, (batch, 1, *[round(p * s) for p, s in zip(patch, sc)])).float() for sc in scales]
times = []
for i in range(steps + 2):
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    output = network(data)
    value = loss(output, targets)
    value.backward()
    torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
    optimizer.step()
    times.append(time.perf_counter() - start)
print(json.dumps({"patch": list(patch), "batch": batch, "threads": torch.get_num_threads(),
                  "features": config.network_arch_init_kwargs["features_per_stage"], "times": times[2:]}))
"""

NNUNET_LOADER = r"""
import json, multiprocessing, os, sys, time, torch
from nnunetv2.run.run_training import get_trainer_from_args
dataset_id, batches = sys.argv[1], int(sys.argv[2])
# built the way nnUNetv2_train builds it (plans, fold, device); initialize() sets batch size and oversampling
trainer = get_trainer_from_args(dataset_id, "3d_fullres", 0, "nnUNetTrainer", "nnUNetPlans", False,
                                device=torch.device("cpu"))
trainer.initialize()
train_loader, val_loader = trainer.get_dataloaders()
for _ in range(4):
    next(train_loader)
start = time.perf_counter()
for _ in range(batches):
    next(train_loader)
elapsed = time.perf_counter() - start
print(json.dumps({"batches_per_s": batches / elapsed}), flush=True)
# os._exit skips multiprocessing's exit handler, so the (daemon) augmentation workers must be ended here: they
# would otherwise outlive us and hold the captured stdout open (that was the earlier "hang" of this benchmark)
for child in multiprocessing.active_children():
    child.terminate()
os._exit(0)
"""

OURS_STEP = r"""
import json, sys, time, torch
from pathlib import Path
from autoseg.contracts.plans import ArchitectureSpec, Configuration, Plans, Resampling
from autoseg.training.loop import train_step
from autoseg.training.losses import LossContext, build_loss
from autoseg.training.parts import StepParts, random_batch
plans_file, num_classes, steps, variant = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
nn_config = json.load(open(plans_file))["configurations"]["3d_fullres"]
arch = nn_config["architecture"]["arch_kwargs"]
patch, batch = nn_config["patch_size"], nn_config["batch_size"]
spec = ArchitectureSpec(name="unet", patch_size=patch, strides=arch["strides"], kernel_sizes=arch["kernel_sizes"],
                        features=arch["features_per_stage"], deep_supervision=True)
from autoseg import networks
network = networks.build(spec.network_spec(1, num_classes))
network.train()
config = Configuration(name="3d_fullres", data_identifier="3d_fullres", dims=3, target_spacing=[1, 1, 1],
                       patch_size=patch, batch_size=batch, median_shape=patch, normalization=["zscore"],
                       use_mask_for_norm=[False], resampling=Resampling(), architecture=spec)
optimizer = torch.optim.SGD(network.parameters(), 0.01, weight_decay=3e-5, momentum=0.99, nesterov=True)
batch_data = random_batch(network, config, 1, num_classes, batch)
dtype = torch.bfloat16 if "bf16" in variant else None
if "t1" in variant:
    torch.set_num_threads(1)
parts = StepParts(network, optimizer, build_loss("dice_ce", LossContext(3, num_classes, False)),
                  list(network.ds_weights), dtype)
times = []
for i in range(steps + 2):
    start = time.perf_counter()
    train_step(parts, batch_data, torch.device("cpu"), 0, i, Path("."))
    times.append(time.perf_counter() - start)
print(json.dumps({"patch": patch, "batch": batch, "threads": torch.get_num_threads(),
                  "features": arch["features_per_stage"], "times": times[2:]}))
"""

OURS_LOADER = r"""
import json, os, sys, time
from autoseg.contracts.plans import load_plans
from autoseg.contracts.splits import fold_cases
from autoseg.training.augmentation import augmentation_settings, sample_size_for, training_transforms
from autoseg.training.data import PatchSampler
from autoseg.training.loader import BatchLoader
from autoseg.training.trainer import build_network
preprocessed, batches = sys.argv[1], int(sys.argv[2])
from pathlib import Path
plans = load_plans(Path(preprocessed) / "plans.json")
config = plans.configuration("3d_fullres")
network = build_network(plans, config)
settings = augmentation_settings(config.patch_size)
train_ids, _ = fold_cases(Path(preprocessed), 0)
sampler = PatchSampler(Path(preprocessed) / config.data_identifier, train_ids, sample_size_for(config.patch_size, settings),
                       config.batch_size, config.dims)
loader = BatchLoader(sampler, training_transforms(config.patch_size, settings, list(network.ds_scales)), num_workers=2,
                     seed=0)
for _ in range(4):
    next(loader)
start = time.perf_counter()
for _ in range(batches):
    next(loader)
elapsed = time.perf_counter() - start
print(json.dumps({"batches_per_s": batches / elapsed, "patch": config.patch_size, "batch": config.batch_size}),
      flush=True)
loader.close()
os._exit(0)
"""


def _run(python: Path, code: str, args: list[str], env: dict | None = None) -> dict:
    result = subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, cwd=REPO, timeout=1200)
    if result.returncode != 0:
        raise SystemExit(f"{python} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def prepare(work: Path, nnunet_python: Path) -> tuple[Path, Path]:
    """(our preprocessed folder, nnU-Net's preprocessed folder) of SynthMR, made once under ``work``."""
    root = work / "autoseg"
    raw = root / "raw" / DATASET
    ours = root / "preprocessed" / DATASET
    nn_base = work / "nnunet"
    theirs = nn_base / "nnUNet_preprocessed" / DATASET
    if not (raw / "dataset.json").is_file():
        subprocess.run([sys.executable, str(SHARED / "bench" / "make_synthetic.py"), str(raw), "-n", "20", "--seed", "0"],
                       check=True)
    if not (ours / "plans.json").is_file():
        subprocess.run([str(REPO / ".venv" / "bin" / "autoseg"), "plan", DATASET, "--root", str(root)], check=True)
    if not (theirs / "nnUNetPlans.json").is_file():
        (nn_base / "nnUNet_raw").mkdir(parents=True, exist_ok=True)
        link = nn_base / "nnUNet_raw" / DATASET
        if not link.exists():
            link.symlink_to(raw.resolve())
        env = {**os.environ, "nnUNet_raw": str(nn_base / "nnUNet_raw"),
               "nnUNet_preprocessed": str(nn_base / "nnUNet_preprocessed"), "nnUNet_results": str(nn_base / "results")}
        subprocess.run([str(nnunet_python.parent / "nnUNetv2_plan_and_preprocess"), "-d", "970", "-c", "3d_fullres",
                        "-np", "2"], check=True, env=env)
    return ours, theirs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_train"))
    parser.add_argument("--nnunet-venv", type=Path, default=REPO / ".venv-nnunet")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "training.md")
    args = parser.parse_args(argv)
    nnunet_python = args.nnunet_venv / "bin" / "python"
    ours_python = REPO / ".venv" / "bin" / "python"
    ours_pre, theirs_pre = prepare(args.work, nnunet_python)
    plans_file = str(theirs_pre / "nnUNetPlans.json")
    num_classes = len(json.loads((theirs_pre / "dataset.json").read_text())["labels"])

    step = {"nnU-Net (fp32)": [], "autoseg (fp32)": [], "autoseg (bf16 autocast)": []}
    info = {}
    for round_index in range(0 if args.skip_step else args.rounds):
        order = list(step) if round_index % 2 == 0 else list(reversed(step))
        for name in order:
            if name.startswith("nnU-Net"):
                result = _run(nnunet_python, NNUNET_STEP, [plans_file, str(num_classes), str(args.steps)])
            else:
                result = _run(ours_python, OURS_STEP, [plans_file, str(num_classes), str(args.steps),
                                                         "bf16" if "bf16" in name else "fp32"])
            step[name].append(statistics.median(result["times"]))
            info = result
            print(name, round(step[name][-1], 3), "s/step", flush=True)
    loader = {"nnU-Net": [], "autoseg": []}
    if not args.skip_loader:
        env = {"nnUNet_preprocessed": str(theirs_pre.parent), "nnUNet_raw": str(args.work / "nnunet" / "nnUNet_raw"),
               "nnUNet_results": str(args.work / "nnunet" / "results"), "nnUNet_n_proc_DA": "2"}
        for round_index in range(args.rounds):
            order = list(loader) if round_index % 2 == 0 else list(reversed(loader))
            for name in order:
                if name == "nnU-Net":
                    result = _run(nnunet_python, NNUNET_LOADER, ["970", str(args.batches)], env)
                else:
                    result = _run(ours_python, OURS_LOADER, [str(ours_pre), str(args.batches)])
                loader[name].append(result["batches_per_s"])
                print(name, "loader", round(loader[name][-1], 2), "batches/s", flush=True)

    import platform

    reference = statistics.median(step["nnU-Net (fp32)"]) if step["nnU-Net (fp32)"] else float("nan")
    lines = [f"# Training throughput, autoseg vs nnU-Net v2 2.8.1 ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared (noisy: "
             "compare ratios from one run). Script: `benchmarks/bench_training.py`.", "",
             f"## Training step at nnU-Net's 3d_fullres plan of {DATASET}: patch {info.get('patch')}, batch "
             f"{info.get('batch')}, features {info.get('features')}", "",
             f"Forward + Dice/CE with deep supervision + backward + clip + SGD, random data, {args.steps} steps per "
             f"process after 2 warm-up steps, processes alternating over {args.rounds} rounds; median over rounds.", "",
             "| side | s/step (median) | per round | speed-up vs nnU-Net |", "|---|---|---|---|"]
    for name, values in step.items() if not args.skip_step else ():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.3f} | {', '.join(f'{v:.2f}' for v in values)} | {reference / median:.2f}x |")
    if loader["autoseg"]:
        theirs = statistics.median(loader["nnU-Net"])
        lines += ["", f"## Data pipeline: augmented training batches/s, 2 workers, {args.batches} batches after 4", "",
                  "| side | batches/s (median) | per round | ratio vs nnU-Net |", "|---|---|---|---|"]
        for name, values in loader.items():
            median = statistics.median(values)
            lines.append(f"| {name} | {median:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {median / theirs:.2f}x |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
