"""`autoseg train`: one fold of one configuration, from the plan to checkpoint_final.pt and its validation.

What runs when you type `autoseg train D C F`, in order:
1. :func:`train` resolves the dataset, plan, fold and folder (one process per fold: autoseg.locks), merges the
   options with run.json for --continue (run.py) and clears or refuses an earlier run;
2. :func:`_train_fold` assembles the parts (parts.py: network from the architecture registry, loss and
   learning-rate schedule from their registries, optimiser, loaders, the --time-budget clock of budget.py)
   and the state to start from (state.py: fresh, or what --continue loads);
3. the loop (loop.py) trains epochs until the epochs or the budget are used up, saving checkpoints;
4. checkpoint_final.pt, then the sliding-window validation of the fold's cases (validation.py).

Defaults of the nnU-Net method (Isensee et al., Nature Methods 2021; nnunetv2's nnUNetTrainer): 1000 epochs x
250 iterations, SGD lr 0.01 momentum 0.99 Nesterov weight decay 3e-5, poly LR 0.9, Dice + CE with deep
supervision, gradient norm clipped at 12, AMP on CUDA, checkpoint_latest every 50 epochs, checkpoint_best by
the EMA (0.9/0.1) of the mean pseudo-Dice of the validation batches. Each number lives in the module of the
part it belongs to. docs/training.md explains every option.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import platform
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from autoseg.contracts.checkpoint import FINAL, LATEST
from autoseg.contracts.plans import PLANS_FILE, load_plans
from autoseg.contracts.splits import SPLITS_FILE, fold_cases, load_splits, parse_fold
from autoseg.device import choose_device, configure_threads
from autoseg.errors import (
    AutosegError,
    ConfigurationError,
    PreprocessingError,
    TrainingError,
)
from autoseg.fileio import remove_partial_files, write_json
from autoseg.locks import fold_lock
from autoseg.paths import ensure_inside, environment_summary, fold_folder, resolve_dataset
from autoseg.preprocessing.store import list_stored_cases
from autoseg.training import distributed
from autoseg.training.budget import training_threads
from autoseg.training.cascade import prepare_previous_stage, previous_stage_folder, previous_stage_sources
from autoseg.training.job import FoldJob
from autoseg.training.loop import (
    CHECKPOINT_EVERY,
    CHECKPOINT_INTERVAL_S,
    LoopOptions,
    interrupted,
    run_epochs,
    seed_everything,
)
from autoseg.training.parts import build_network, build_parts, class_names
from autoseg.training.progress import Curves, epoch_line, plot_progress, print_epoch_line, write_curves
from autoseg.training.run import (
    DEFAULT_SEED,
    RUN_FILE,
    RunOptions,
    merge_for_continue,
    now_iso,
    options_from_checkpoint,
    read_run_options,
    refuse_mixing_runs,
    remove_run,
    write_run_options,
)
from autoseg.training.losses import require_loss
from autoseg.training.schedule import build_schedule, format_duration, parse_duration
from autoseg.training.state import TrainingState, resume_state, resumed_configuration, save_state

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 2

__all__ = ["train", "build_network", "fold_cases"]


# ------------------------------------------------------------------------------------------ resolution
def _resolve(dataset: str | int, configuration: str, fold: int | str, root: Any, architecture: str | None):
    location = resolve_dataset(dataset, root)
    plans_file = location.preprocessed / PLANS_FILE
    if not plans_file.is_file():
        raise PreprocessingError(
            f"{plans_file}: no preprocessed data for {location.name}; run `autoseg plan {location.name}` first "
            "(it plans and preprocesses)"
        )
    plans = load_plans(plans_file)
    scheme = plans.label_scheme
    if scheme.has_regions or scheme.ignore_value is not None:
        kind = "regions (labels with lists of values)" if scheme.has_regions else "an 'ignore' label"
        raise ConfigurationError(
            f"{plans_file}: {location.name} declares {kind}; autoseg verifies, plans, preprocesses and evaluates "
            "such datasets, but cannot train them yet (docs/datasets.md); train a copy whose dataset.json has "
            "one integer per label"
        )
    config = plans.configuration(configuration, architecture)
    train_ids, val_ids = fold_cases(location.preprocessed, fold)
    fold = parse_fold(fold, len(load_splits(location.preprocessed)), location.preprocessed / SPLITS_FILE)
    store = ensure_inside(location.preprocessed / config.data_identifier, location.preprocessed,
                          "the preprocessed folder of the configuration")
    stored = set(list_stored_cases(store))
    missing = sorted(set(train_ids + val_ids) - stored)
    if missing:
        raise PreprocessingError(
            f"{store}: {len(missing)} case(s) of fold {fold} are not preprocessed (e.g. {', '.join(missing[:3])}); "
            f"run `autoseg preprocess {location.name} -c {config.data_identifier}` (or `autoseg plan {location.name}`)"
        )
    if config.previous_stage:
        # fail before anything is written (and on every DDP rank alike) when the previous stage is not ready
        previous_stage_sources(location, plans, config, load_splits(location.preprocessed),
                               sorted(set(train_ids) | set(val_ids)), root)
    return location, plans, config, fold, train_ids, val_ids, store


# ------------------------------------------------------------------------------------------------ setup
def _environment(device: torch.device, context: distributed.DistributedContext) -> dict[str, Any]:
    import batchgenerators

    from autoseg import __version__

    return {
        "autoseg": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "numpy": np.__version__,
        "batchgenerators": getattr(batchgenerators, "__version__", "unknown"),
        "device": str(device), "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(), "world_size": context.world_size,
        "argv": sys.argv, "environment": environment_summary(),
    }


# ------------------------------------------------------------------------------------------------ train
def train(
    dataset: str | int,
    configuration: str,
    fold: int | str,
    root: str | os.PathLike | None = None,
    architecture: str | None = None,
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    continue_training: bool = False,
    device: str = "auto",
    compile_network: bool = False,
    selfreg: bool | None = None,
    pretrained: str | os.PathLike | None = None,
    seed: int | None = None,
    time_budget: str | float | None = None,
    num_workers: int | None = None,
    validate: bool = True,
    force: bool = False,
    *,
    loss: str | None = None,
    lr_schedule: str | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
    validation_iterations: int | None = None,
    on_epoch_end: Callable[[int, Curves], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Path:
    """Train one fold of one configuration; returns the fold folder (see docs/training.md).

    ``None`` for ``seed``, ``selfreg``, ``epochs``, ... means "not given": the default for a new run, the
    run's own value (run.json) for ``continue_training``. ``force`` deletes an earlier run's files first.
    Keyword-only extras: ``loss`` and ``lr_schedule`` (names in the registries of losses.py and schedule.py;
    None: the defaults), ``checkpoint_every`` (epochs between checkpoint_latest.pt), ``checkpoint_interval_s``
    (also save latest when this much time passed, checked every iteration), ``validation_iterations`` per
    epoch (default 1/5 of the training iterations), ``on_epoch_end(epoch, curves)`` callback (notebooks, tests),
    ``clock``: the run's source of monotonic seconds (budget, step timing, checkpoint interval); a simulated
    clock makes a --time-budget run independent of the machine's speed (tests).
    """
    session_start = clock()
    if epochs is not None and epochs < 1 or iterations_per_epoch is not None and iterations_per_epoch < 1:
        raise ConfigurationError(f"--epochs and --iters-per-epoch must be >= 1, got {epochs} and {iterations_per_epoch}")
    if loss is not None:
        require_loss(loss)
    if lr_schedule is not None:
        build_schedule(lr_schedule)  # an unknown name fails here, before the fold folder is touched
    location, plans, config, fold, train_ids, val_ids, store = _resolve(dataset, configuration, fold, root, architecture)
    arch = config.architecture.name
    output = fold_folder(location, config.name, arch, fold)
    command = f"autoseg train {location.name} {config.name} {fold}" + (f" --root {root}" if root is not None else "")
    if force and continue_training:
        raise ConfigurationError(
            f"{output}: --force (delete the earlier run and start over) and --continue (resume it) contradict "
            "each other; give one of them"
        )
    torch_device = choose_device(device)
    context = distributed.init_distributed(torch_device)
    if torch_device.type == "cuda" and context.enabled:
        torch_device = torch.device("cuda", context.local_rank)
    with contextlib.ExitStack() as held:
        # one process per fold: rank 0 holds the lock for the whole run; the other ranks follow its verdict
        _on_main(context, torch_device, lambda: held.enter_context(fold_lock(output)))
        # temporary files of a run killed mid-write (checkpoints, validation outputs): only this run writes here now
        _on_main(context, torch_device,
                 lambda: [remove_partial_files(folder) for folder in (output, output / "validation")])
        given = {"epochs": epochs, "iterations_per_epoch": iterations_per_epoch,
                 "time_budget_s": parse_duration(time_budget), "seed": seed, "selfreg": selfreg,
                 "pretrained": str(pretrained) if pretrained is not None else None, "num_workers": num_workers,
                 "loss": loss, "lr_schedule": lr_schedule}
        options, notes, resuming = _run_options(output, given, continue_training)
        distributed.barrier(context)  # every rank has read the folder before rank 0 changes it
        run = RunOptions(dataset=location.name, configuration=config.name, architecture=arch, fold=str(fold),
                         epochs=options["epochs"], iterations_per_epoch=options["iterations_per_epoch"],
                         time_budget_s=options["time_budget_s"],
                         seed=DEFAULT_SEED if options["seed"] is None else int(options["seed"]),
                         selfreg=bool(options["selfreg"]), pretrained=options["pretrained"],
                         num_workers=DEFAULT_WORKERS if options["num_workers"] is None else int(options["num_workers"]),
                         device=torch_device.type, started=now_iso(), loss=options["loss"],
                         lr_schedule=options["lr_schedule"])
        _on_main(context, torch_device,
                 lambda: notes.extend(_prepare_folder(output, run, continue_training, resuming, force, command)))
        job = FoldJob(location=location, plans=plans, config=config, fold=fold, train_ids=train_ids,
                      val_ids=val_ids, store=store, output=output, run=run, command=command, device=torch_device,
                      context=context, resuming=continue_training and resuming)
        loop_options = LoopOptions(checkpoint_every=checkpoint_every, checkpoint_interval_s=checkpoint_interval_s,
                                   on_epoch_end=on_epoch_end)
        try:
            return _train_fold(job, notes, loop_options, validate=validate, compile_network=compile_network,
                               validation_iterations=validation_iterations, clock=clock, started=session_start)
        except KeyboardInterrupt:
            # outside the loop (setup, validation) or from a callback: no chance to save, say what exists
            raise interrupted(output, command, "interrupted", signal.SIGINT) from None


def _on_main(context: distributed.DistributedContext, device: torch.device, action: Callable[[], Any]) -> None:
    """Run ``action`` on rank 0 only; when it refuses (an AutosegError) every rank stops, not just rank 0
    (the others would wait for it forever)."""
    error = None
    if context.is_main:
        try:
            action()
        except AutosegError as exc:
            error = exc
    if distributed.broadcast_flag(error is not None, context, device):
        if error is not None:
            raise error
        raise TrainingError("rank 0 stopped before training started; its message says why")


def _run_options(output: Path, given: dict[str, Any], continue_training: bool) -> tuple[dict[str, Any], list[str], bool]:
    """(options, notes, resuming): the command line's options, for --continue completed by the interrupted
    run's (run.json, else the checkpoint of a folder from before run.json). ``resuming``: a checkpoint exists
    to resume from."""
    resuming = continue_training and any((output / name).is_file() for name in (LATEST, FINAL))
    if not continue_training:
        return given, [], False
    saved_run = read_run_options(output)
    saved = asdict(saved_run) if saved_run is not None else options_from_checkpoint(output)
    if not saved:
        return given, [f"--continue: nothing to resume in {output} (no {RUN_FILE}, no checkpoint); starting a new "
                       "run with the options given"], False
    options, notes = merge_for_continue(saved, given, output / (RUN_FILE if saved_run is not None else LATEST))
    if not resuming:
        notes.append(f"--continue: {output.name} saved no checkpoint before it stopped; restarting that run from "
                     f"its first epoch with the options of its {RUN_FILE}")
    return options, notes, resuming


def _prepare_folder(output: Path, run: RunOptions, continue_training: bool, resuming: bool, force: bool,
                    command: str) -> list[str]:
    """Refuse to mix two runs in one folder, or clear the earlier run (--force, or a --continue with nothing
    to resume); then write run.json. Returns messages for the log."""
    notes = []
    if not force and not continue_training:
        refuse_mixing_runs(output, command)  # a run with checkpoints is never replaced silently
    if not resuming:
        removed = remove_run(output)
        if removed:
            why = "--force" if force else "--continue" if continue_training else "no checkpoint was saved"
            notes.append(f"{why}: removed the earlier run's {', '.join(removed)}")
    if resuming:
        previous = read_run_options(output)
        if previous is not None:
            run.started, run.resumed = previous.started, [*previous.resumed, now_iso()]
    output.mkdir(parents=True, exist_ok=True)
    write_run_options(output, run)
    return notes




# ---------------------------------------------------------------------------------------------- the run
def _train_fold(job: FoldJob, notes: list[str], loop_options: LoopOptions, *, validate: bool,
                compile_network: bool, validation_iterations: int | None, clock: Callable[[], float],
                started: float) -> Path:
    """The run itself, inside the fold lock, with run.json written: parts, loop, final checkpoint, validation."""
    context, device, output = job.context, job.device, job.output
    if device.type == "cpu":
        configure_threads(training_threads(job.run.num_workers))
    else:
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest kernels
    for note in notes:
        job.say(note)
    if context.is_main:
        write_json(output / "plans.json", job.plans.to_json())
        write_json(output / "environment.json", _environment(device, context))

    seed_everything(job.run.seed + context.rank)
    previous_stage = _previous_stage(job)

    def starting_state(network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainingState:
        return resume_state(output, network, optimizer, job.say) if job.resuming else TrainingState()

    # --continue of a --time-budget run rebuilds the adapted configuration its weights fit
    resumed = resumed_configuration(output) if job.resuming and job.run.time_budget_s else None
    parts, state = build_parts(job, starting_state, resumed, previous_stage, validate=validate,
                               compile_network=compile_network, validation_iterations=validation_iterations,
                               now=clock, started=started)
    config, budget_s = parts.configuration, job.run.time_budget_s
    job.say(f"training {job.location.name} {config.name} ({config.architecture.name}) fold {job.fold}: "
            f"{len(job.train_ids)} train / {len(job.val_ids)} val cases, patch {config.patch_size}, batch "
            f"{config.batch_size}, {parts.total_epochs or 'unlimited'} epochs x {parts.iterations} iterations, "
            f"device {device}{', AMP ' + str(parts.dtype) if parts.dtype else ''}"
            f"{f', time budget {format_duration(budget_s)}' if budget_s else ''}, world size {context.world_size}")
    loop_options.after_epoch = lambda s: _report_epoch(job, parts, s)
    try:
        stop_reason = run_epochs(job, parts, state, loop_options)
    except torch.OutOfMemoryError as exc:
        raise TrainingError(
            f"{output}: the GPU ran out of memory with patch {config.patch_size} and batch {config.batch_size}; "
            f"re-plan with a smaller budget (`autoseg plan {job.location.name} --gpu-memory <GB below your GPU's>`) "
            "and train again"
        ) from exc
    finally:
        parts.close()

    elapsed = parts.clock.elapsed
    if stop_reason:
        job.say(f"stopping after epoch {state.epoch}: {stop_reason} ({format_duration(elapsed())} used of "
                f"{format_duration(budget_s or 0)})")
    if context.is_main:
        for name in (FINAL, LATEST):
            save_state(output / name, job, parts, state)
        job.say(f"training done: {state.epoch} epochs in {format_duration(elapsed())}; {FINAL} written")
        if validate:
            from autoseg.training.validation import final_validation

            final_validation(job, config, device, parts.clock.use_mirroring(state.seconds_per_patch),
                             previous_stage)
        job.say(f"total time {format_duration(elapsed())}")
        write_json(output / "timing.json", {"elapsed_s": float(elapsed()), "time_budget_s": budget_s})
    if context.enabled:
        # DDP's reducer holds the process group; left to the garbage collector it can outlive
        # destroy_process_group into interpreter teardown, where gloo's worker threads must not be joined
        parts.model = None  # type: ignore[assignment]
        gc.collect()
    distributed.barrier(context)
    distributed.shutdown(context)
    return output


def _previous_stage(job: FoldJob) -> Path | None:
    """A cascade's extra inputs: the previous stage's cross-validation predictions on this grid
    (cascade.py); converted once by the main process, which the other ranks wait for."""
    if not job.config.previous_stage:
        return None
    cases = sorted(set(job.train_ids) | set(job.val_ids))
    if job.context.is_main:
        prepare_previous_stage(job.location, job.plans, job.config, job.store, load_splits(job.location.preprocessed),
                               cases, job.say)
    distributed.barrier(job.context)
    return previous_stage_folder(job.location, job.plans, job.config)


def _report_epoch(job: FoldJob, parts, state: TrainingState) -> None:
    """The epoch line (console + log.txt), training_log.json and progress.png."""
    curves, budget_s, epochs = state.curves, job.run.time_budget_s, parts.total_epochs
    if budget_s:
        eta = format_duration(max(0.0, budget_s - parts.clock.elapsed()))
    elif epochs:
        eta = format_duration(float(np.mean(curves.epoch_time[-5:])) * (epochs - state.epoch))
    else:
        eta = "?"
    names = class_names(job.plans)
    print_epoch_line(epoch_line(state.epoch, epochs, curves, names, eta), job.log_file)
    write_curves(curves, job.output / "training_log.json")
    try:
        plot_progress(curves, job.output / "progress.png", names)
    except Exception as exc:  # a plotting failure must never stop training
        log.warning("could not draw progress.png: %s", exc)
