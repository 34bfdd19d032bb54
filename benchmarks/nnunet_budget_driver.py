"""Train nnU-Net v2's default trainer within a wall-clock budget (nnU-Net itself has no such option).

Runs INSIDE the nnU-Net venv (``.venv-nnunet/bin/python``); imports nnunetv2 only, never autoseg. Launched by
``benchmarks/nnunet_side.py`` (``NnUNet.train_budget``) with nnUNet_raw / nnUNet_preprocessed / nnUNet_results
already set in its environment::

    python nnunet_budget_driver.py DATASET_ID CONFIG FOLD --budget-seconds 1200 --started-at <unix time>
                                   [--device cpu] [--iterations-per-epoch 50] [--report report.json]

Exactly what it does to nnU-Net (nothing else is changed; network, loss, augmentation, sampling, optimiser,
poly schedule, checkpointing and the final validation are nnU-Net's own):

1. Builds the trainer the way ``nnUNetv2_train ID CONFIG FOLD -device cpu`` does: ``torch.set_num_threads(
   cpu_count)`` on CPU, then ``nnunetv2.run.run_training.get_trainer_from_args(ID, CONFIG, FOLD,
   "nnUNetTrainer", "nnUNetPlans", device=...)`` (the default ``nnUNetTrainer`` and default plans).
2. Sets ``num_iterations_per_epoch = 50`` (default 250) and ``num_val_iterations_per_epoch = 10`` (default
   50: the same 1:5 ratio) so that even a short budget holds several epochs of the poly schedule.
3. Replaces ``trainer.on_train_start`` on the INSTANCE with a wrapper that first calls nnU-Net's own
   ``on_train_start`` (initialise network/optimiser/loss, data loaders, unpack, copy plans) and then
   CALIBRATES: one warm-up + ``--calibration-iterations`` timed ``train_step`` calls on real augmented
   batches, two timed ``validation_step`` calls, a timed batch-1 forward of one patch without deep
   supervision (the unit of the final sliding-window validation) and a timed checkpoint save. The timed
   train steps are ordinary nnU-Net training steps at its initial LR (which is also epoch 0's LR), so they
   are kept as training (weights and SGD momentum), like a few extra iterations of epoch 0, rather than
   thrown away: on 2 CPU cores each costs seconds of the budget. Only the LR scheduler must be rebuilt,
   because nnU-Net's ``PolyLRScheduler`` fixed ``max_steps = num_epochs`` when ``initialize()`` built it:
   ``configure_optimizers()`` is called again for a scheduler with the new epoch count and the fresh
   optimiser it returns is given the old one's state (``load_state_dict``), so nothing is lost.
4. Budget arithmetic (all wall-clock, from ``--started-at``, the moment the parent launched this process, so
   interpreter start-up, imports, data-loader start and the calibration all count):
   ``reserve`` = estimated final validation (tiles per validation case x mirror combinations x patch forward
   time + an export allowance per case + start-up of nnU-Net's two spawn pools) x 1.25 safety; ``per_epoch``
   = iterations x train step + val iterations x val step + checkpoint/plot overhead; ``num_epochs`` =
   floor((deadline - now - reserve) / per_epoch), and the iterations per epoch are then raised (50 to < 100)
   so that these epochs fill the time. When not even one epoch of 50 fits, it is one epoch with as many
   iterations as fit. ``num_epochs`` is set before ``run_training()`` evaluates its epoch range,
   so nnU-Net's PolyLR runs its whole ``lr0 * (1 - epoch/num_epochs)^0.9`` course within the budget.
5. Keeps the deadline on a noisy shared machine: ``trainer.on_epoch_end`` is wrapped on the instance; after
   nnU-Net's own ``on_epoch_end`` it re-measures the seconds per iteration of the epoch just finished and
   sets ``num_iterations_per_epoch`` (read afresh by ``run_training`` every epoch) for the remaining epochs so
   they end at ``deadline - reserve`` (clamped to 1 .. 2 x the nominal 50; the val iterations follow at 1:5).
   The epoch count, hence the LR schedule's shape, never changes after step 4.
6. ``trainer.run_training()`` then ``trainer.perform_actual_validation(False)``, exactly what
   ``nnUNetv2_train`` calls, so ``fold_<k>/validation/`` holds nnU-Net's own validation predictions.
7. Writes ``--report`` (JSON): the calibration numbers, the epoch/iteration plan, every per-epoch adjustment,
   and when training and validation ended relative to the budget.

Top-level imports are standard library only: nnU-Net's validation uses ``spawn`` worker pools, which
re-import this file as ``__mp_main__`` in every worker, and that must stay cheap.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any

NOMINAL_ITERATIONS = 50  # per epoch, instead of nnU-Net's 250: several poly-schedule epochs fit a short budget
VAL_RATIO = 0.2  # nnU-Net's own ratio: 50 validation iterations per 250 training iterations
RESERVE_SAFETY = 1.25  # the final-validation estimate is rough (export, pools): err on the early side
EXPORT_S_PER_CASE = 1.0  # resample-back + write of one validation case (small 3D images on 2 cores, measured ~0.3-1 s)
PLOT_AND_LOG_S = 0.7  # nnU-Net redraws progress.png and writes its log every epoch (matplotlib, ~0.5 s on CPU)
MAX_ITERATION_FACTOR = 2  # per-epoch correction may at most double the nominal iterations
POOL_IMPORT_FRACTION = 0.5  # a spawn-pool worker's import cost relative to this driver's (see calibrate)


def log(message: str) -> None:
    print(f"[budget-driver] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset_id")
    parser.add_argument("configuration")
    parser.add_argument("fold")
    parser.add_argument("--budget-seconds", type=float, required=True, help="wall-clock budget of this process")
    parser.add_argument("--started-at", type=float, default=None,
                        help="unix time the parent launched us (default: now); the budget counts from here")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    parser.add_argument("--iterations-per-epoch", type=int, default=NOMINAL_ITERATIONS)
    parser.add_argument("--calibration-iterations", type=int, default=3)
    parser.add_argument("--report", default=None, help="write the JSON report here")
    return parser.parse_args(argv)


def validation_tiles(trainer: Any, step_size: float = 0.5) -> tuple[int, int]:
    """(total sliding-window tiles over the fold's validation cases, number of validation cases), counted with
    nnU-Net's own tiling function on the preprocessed shapes (2D configurations tile every slice)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    _, val_keys = trainer.do_split()
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, val_keys,
                                    folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    patch = [int(p) for p in trainer.configuration_manager.patch_size]
    total = 0
    for key in dataset.identifiers:
        shape = [int(s) for s in dataset.load_case(key)[0].shape[1:]]  # [Z, Y, X] without channels
        slices = shape[0] if len(patch) == 2 else 1
        spatial = shape[-len(patch):]
        padded = [max(s, p) for s, p in zip(spatial, patch)]  # nnU-Net pads images smaller than the patch
        steps = compute_steps_for_sliding_window(padded, patch, step_size)
        total += slices * math.prod(len(axis) for axis in steps)
    return total, len(dataset.identifiers)


def calibrate(trainer: Any, iterations: int, import_s: float) -> dict[str, float]:
    """Time train/val steps, one sliding-window patch forward and a checkpoint save on the initialised trainer."""
    import torch
    from nnunetv2.configuration import default_num_processes

    def sync() -> None:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()

    trainer.network.train()
    times = []
    for index in range(iterations + 1):  # the first step allocates buffers / warms kernels: not timed
        batch = next(trainer.dataloader_train)
        sync()
        start = time.perf_counter()
        trainer.train_step(batch)
        sync()
        if index:
            times.append(time.perf_counter() - start)
    train_step_s = statistics.median(times)

    trainer.network.eval()
    val_times = []
    with torch.no_grad():
        for _ in range(2):
            batch = next(trainer.dataloader_val)
            start = time.perf_counter()
            trainer.validation_step(batch)
            sync()
            val_times.append(time.perf_counter() - start)
        trainer.set_deep_supervision_enabled(False)
        patch = torch.zeros((1, trainer.num_input_channels, *trainer.configuration_manager.patch_size),
                            device=trainer.device)
        trainer.network(patch)  # warm-up
        sync()
        start = time.perf_counter()
        trainer.network(patch)
        sync()
        forward_s = time.perf_counter() - start
        trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    trainer.network.train()

    probe = os.path.join(trainer.output_folder, "checkpoint_budget_probe.pth")
    start = time.perf_counter()
    trainer.save_checkpoint(probe)
    checkpoint_s = time.perf_counter() - start
    if os.path.isfile(probe):
        os.remove(probe)

    tiles, cases = validation_tiles(trainer)
    mirrors = 2 ** len(trainer.inference_allowed_mirroring_axes or ())
    cores = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    # nnU-Net's validation starts a spawn pool of default_num_processes (8 unless nnUNet_def_n_proc) for export,
    # then another for its metrics; every worker imports torch + part of nnunetv2 on the shared cores. A worker
    # imports less than this driver did (the trainer stack), hence the 0.5: on the 2-core plumbing run (load ~10)
    # the whole validation of 2 small cases took 104 s with import_s = 21 s, of which ~30 s was prediction
    pool_start_s = 2 * POOL_IMPORT_FRACTION * import_s * default_num_processes / cores
    final_validation_s = tiles * mirrors * forward_s + cases * EXPORT_S_PER_CASE + pool_start_s + checkpoint_s
    return {
        "train_step_s": train_step_s, "train_step_samples_s": times, "val_step_s": statistics.median(val_times),
        "patch_forward_s": forward_s, "checkpoint_save_s": checkpoint_s, "validation_tiles": tiles,
        "validation_cases": cases, "mirror_combinations": mirrors, "pool_start_s": pool_start_s,
        "final_validation_estimate_s": final_validation_s, "import_s": import_s,
        "default_num_processes": default_num_processes, "cores": cores,
    }


def plan_epochs(time_left_s: float, reserve_s: float, calibration: dict[str, float], nominal: int) -> dict[str, Any]:
    """Epochs and iterations per epoch so that training ends ``reserve_s`` before the deadline."""
    overhead_s = calibration["checkpoint_save_s"] + PLOT_AND_LOG_S
    per_iteration_s = calibration["train_step_s"] + VAL_RATIO * calibration["val_step_s"]
    training_s = time_left_s - reserve_s
    per_epoch_s = nominal * per_iteration_s + overhead_s
    epochs = int(training_s // per_epoch_s)
    if epochs < 1:  # not even one nominal epoch: one shorter epoch (still at least one step)
        epochs = 1
        iterations = max(1, int((training_s - overhead_s) // per_iteration_s))
    else:
        # stretch the epochs to fill the budget: rounding the epoch count down would otherwise leave up to one
        # epoch's time unused, and when only one or two epochs fit the per-epoch correction never gets to act
        # (1.47 nominal epochs on ISBI EM left 45 % of nnU-Net's budget idle). Stays within [nominal, 2 x nominal)
        iterations = max(nominal, int((training_s / epochs - overhead_s) // per_iteration_s))
    return {"num_epochs": epochs, "num_iterations_per_epoch": iterations,
            "num_val_iterations_per_epoch": max(1, round(iterations * VAL_RATIO)), "training_time_s": training_s,
            "per_epoch_estimate_s": iterations * per_iteration_s + overhead_s, "epoch_overhead_s": overhead_s}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = args.started_at if args.started_at is not None else time.time()
    deadline = started_at + args.budget_seconds
    report: dict[str, Any] = {"budget_s": args.budget_seconds, "started_at": started_at, "dataset": args.dataset_id,
                              "configuration": args.configuration, "fold": args.fold, "device": args.device,
                              "trainer": "nnUNetTrainer", "plans": "nnUNetPlans", "adjustments": []}

    def write_report() -> None:
        if args.report:
            tmp = args.report + ".tmp"
            with open(tmp, "w") as handle:
                json.dump(report, handle, indent=1)
            os.replace(tmp, args.report)

    import_start = time.perf_counter()
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    import_s = time.perf_counter() - import_start

    if args.device == "cpu":  # what nnUNetv2_train -device cpu does
        torch.set_num_threads(multiprocessing.cpu_count())
    elif args.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    fold: int | str = args.fold if args.fold == "all" else int(args.fold)
    trainer = get_trainer_from_args(str(args.dataset_id), args.configuration, fold, "nnUNetTrainer", "nnUNetPlans",
                                    False, device=torch.device(args.device))
    if args.device == "cuda":
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    nominal = args.iterations_per_epoch
    trainer.num_iterations_per_epoch = nominal
    trainer.num_val_iterations_per_epoch = max(1, round(nominal * VAL_RATIO))

    original_on_train_start = trainer.on_train_start
    original_on_epoch_end = trainer.on_epoch_end
    state: dict[str, Any] = {}

    def on_train_start() -> None:
        original_on_train_start()
        calibration_start = time.time()
        calibration = calibrate(trainer, args.calibration_iterations, import_s)
        now = time.time()
        reserve_s = calibration["final_validation_estimate_s"] * RESERVE_SAFETY
        plan = plan_epochs(deadline - now, reserve_s, calibration, nominal)
        trainer.num_epochs = plan["num_epochs"]
        trainer.num_iterations_per_epoch = plan["num_iterations_per_epoch"]
        trainer.num_val_iterations_per_epoch = plan["num_val_iterations_per_epoch"]
        # PolyLRScheduler fixed max_steps = num_epochs when initialize() built it: rebuild it with nnU-Net's own
        # configure_optimizers() and carry the SGD state (momentum of the calibration steps) over
        optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
        optimizer.load_state_dict(trainer.optimizer.state_dict())
        trainer.optimizer = optimizer
        state.update(reserve_s=reserve_s, epoch_started=time.time(), overhead_s=plan["epoch_overhead_s"])
        report.update(calibration=calibration, plan=plan, reserve_s=reserve_s,
                      setup_s=calibration_start - started_at, calibration_s=now - calibration_start,
                      training_started_s=time.time() - started_at)
        message = (f"time budget {args.budget_seconds:.0f} s: setup {calibration_start - started_at:.1f} s, "
                   f"calibration {now - calibration_start:.1f} s (train step {calibration['train_step_s']:.2f} s, "
                   f"val step {calibration['val_step_s']:.2f} s), final validation reserve {reserve_s:.1f} s -> "
                   f"{plan['num_epochs']} epochs x {plan['num_iterations_per_epoch']} iterations "
                   f"({plan['num_val_iterations_per_epoch']} val iterations)")
        trainer.print_to_log_file(message)
        log(message)
        write_report()

    def on_epoch_end() -> None:
        iterations_done = trainer.num_iterations_per_epoch
        original_on_epoch_end()  # nnU-Net's own: log, checkpoint_best, progress.png, current_epoch += 1
        now = time.time()
        duration = now - state["epoch_started"]
        state["epoch_started"] = now
        remaining_epochs = trainer.num_epochs - trainer.current_epoch
        entry: dict[str, Any] = {"epoch": trainer.current_epoch - 1, "iterations": iterations_done,
                                 "duration_s": duration, "elapsed_s": now - started_at}
        if remaining_epochs > 0:
            per_iteration_s = max(duration - state["overhead_s"], 1e-3) / iterations_done
            per_epoch_s = (deadline - now - state["reserve_s"]) / remaining_epochs
            iterations = int((per_epoch_s - state["overhead_s"]) // per_iteration_s)
            iterations = min(max(iterations, 1), MAX_ITERATION_FACTOR * nominal)
            if iterations != trainer.num_iterations_per_epoch:
                trainer.print_to_log_file(f"time budget: {iterations} iterations per epoch for the remaining "
                                          f"{remaining_epochs} epoch(s) ({per_iteration_s:.2f} s per iteration)")
            trainer.num_iterations_per_epoch = iterations
            trainer.num_val_iterations_per_epoch = max(1, round(iterations * VAL_RATIO))
            entry["next_iterations"] = iterations
        report["adjustments"].append(entry)
        write_report()

    # instance attributes shadow the class methods that run_training() calls as self.on_train_start() etc.
    trainer.on_train_start = on_train_start
    trainer.on_epoch_end = on_epoch_end

    trainer.run_training()
    report["training_ended_s"] = time.time() - started_at
    write_report()
    trainer.perform_actual_validation(False)
    report["validation_ended_s"] = time.time() - started_at
    report["final_validation_s"] = report["validation_ended_s"] - report["training_ended_s"]
    report["over_budget_s"] = max(0.0, report["validation_ended_s"] - args.budget_seconds)
    report["epochs_done"] = trainer.current_epoch
    # the calibration's train steps (warm-up included) were real training steps too
    report["iterations_done"] = (sum(a["iterations"] for a in report["adjustments"])
                                 + args.calibration_iterations + 1)
    write_report()
    log(f"done: {report['epochs_done']} epochs, {report['iterations_done']} iterations, training ended at "
        f"{report['training_ended_s']:.1f} s, validation at {report['validation_ended_s']:.1f} s of "
        f"{args.budget_seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
