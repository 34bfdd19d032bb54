"""`autoseg train`: the training loop, assembled from parts chosen by the plan and the options.

Parts (one module each): patch sampler (data), augmentation, loader, losses, schedule, checkpoint, progress,
distributed. Defaults of the nnU-Net method (Isensee et al., Nature Methods 2021; nnunetv2's nnUNetTrainer): 1000 epochs x
250 iterations, SGD lr 0.01 momentum 0.99 Nesterov weight decay 3e-5, poly LR 0.9, Dice + CE with deep
supervision, gradient norm clipped at 12, AMP on CUDA, checkpoint_latest every 50 epochs, checkpoint_best by
the EMA (0.9/0.1) of the mean pseudo-Dice of the validation batches, checkpoint_final, then a sliding-window
prediction of the fold's validation cases. docs/training.md explains every option.

One run per fold folder at a time: a lock (autoseg.locks) refuses a second process, run.json (run.py) keeps the
options a --continue resumes, and SIGINT/SIGTERM save checkpoint_latest.pt at the next iteration boundary.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from autoseg.contracts.checkpoint import (
    BEST,
    FINAL,
    LATEST,
    CheckpointMetadata,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from autoseg.contracts.plans import PLANS_FILE, Configuration, Plans, load_plans
from autoseg.contracts.splits import SPLITS_FILE, fold_cases, load_splits, parse_fold
from autoseg.device import amp_dtype, choose_device, configure_threads
from autoseg.errors import (
    AutosegError,
    CheckpointError,
    ConfigurationError,
    PreprocessingError,
    TrainingError,
    TrainingInterrupted,
)
from autoseg.evaluation.metrics import dice_from_counts
from autoseg.fileio import atomic_path, remove_partial_files, write_json
from autoseg.locks import fold_lock
from autoseg.paths import ensure_inside, environment_summary, fold_folder, resolve_dataset
from autoseg.preprocessing.store import list_stored_cases
from autoseg.training import distributed
from autoseg.training.budget import BudgetChoice, adapt_to_budget, training_threads
from autoseg.training.augmentation import (
    CentreCrop,
    augmentation_settings,
    sample_size_for,
    training_transforms,
    validation_transforms,
)
from autoseg.training.checkpoint import capture_rng_state, restore_rng_state
from autoseg.training.cascade import (
    load_previous_stage,
    prepare_previous_stage,
    previous_stage_folder,
    previous_stage_sources,
)
from autoseg.training.data import PatchSampler
from autoseg.training.loader import BatchLoader
from autoseg.training.losses import deep_supervision_loss
from autoseg.training.progress import (
    Curves,
    append_log,
    duration_warning,
    epoch_line,
    iteration_bar,
    plot_progress,
    print_epoch_line,
    write_curves,
)
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
from autoseg.training.schedule import format_duration, parse_duration, poly_lr, training_progress

log = logging.getLogger(__name__)

# nnU-Net training defaults (Isensee et al., Nature Methods 2021)
DEFAULT_EPOCHS = 1000
DEFAULT_ITERATIONS = 250
INITIAL_LR = 0.01
MOMENTUM = 0.99
WEIGHT_DECAY = 3e-5
GRADIENT_CLIP = 12.0
EMA_DECAY = 0.9  # ema = 0.9 ema + 0.1 mean pseudo-Dice
VALIDATION_FRACTION = 0.2  # 50 validation iterations per 250 training iterations
PER_CASE_OVERHEAD_S = 0.75  # final validation, per case, besides the network (see _ValidationEstimate)
VALIDATION_OVERHEAD = 2.0  # an epoch-validation batch costs ~2x its forward time (sampling, loss, Dice counts)
CHECKPOINT_EVERY = 50  # epochs between checkpoint_latest.pt, as in the reference
# ... and at least every 5 minutes, checked at every iteration (mid-epoch too: a CPU epoch can take 10 minutes).
# A 3D U-Net checkpoint (weights + SGD momentum, ~250 MB) takes 0.5-3 s to write and fsync, so this costs
# at most ~1 % of the time, and a kill (without the SIGTERM that lets us save) loses 5 minutes at most.
CHECKPOINT_INTERVAL_S = 300.0
DEFAULT_WORKERS = 2


@dataclass
class TrainingState:
    """Everything --continue needs besides the weights and the optimiser."""

    epoch: int = 0  # completed epochs
    curves: Curves = field(default_factory=Curves)
    ema: float | None = None
    best_ema: float = -1.0
    elapsed_s: float = 0.0  # wall-clock training time across runs (the --time-budget clock)
    seconds_per_patch: float | None = None  # measured inference time per patch (validation estimate)
    iterations_done: int = 0  # training iterations over all epochs and runs
    budget_choice: dict[str, Any] | None = None  # BudgetChoice.to_json() of a --time-budget run
    budget_reasons: list[str] = field(default_factory=list)
    # a checkpoint saved mid-epoch (a signal, the 5-minute save): iterations of epoch ``epoch`` already done and
    # their losses, so a resume finishes that epoch exactly as an uninterrupted run would have
    epoch_iteration: int = 0
    epoch_losses: list[float] = field(default_factory=list)


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
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, rank: int, stream: int = 0) -> int:
    """A seed per (run seed, epoch, rank): each epoch's random stream depends only on these, so resuming
    from an epoch boundary replays exactly what an uninterrupted run would have drawn."""
    return int(np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(1)[0])


def build_network(plans: Plans, config: Configuration) -> nn.Module:
    from autoseg import networks
    from autoseg.errors import ConfigurationError, reraised_as
    from autoseg.networks.errors import NetworkError

    with reraised_as(ConfigurationError, NetworkError):  # same one-line message as before networks had their own error
        return networks.build(config.architecture.network_spec(plans.network_in_channels(config), plans.num_classes))


def _load_pretrained(network: nn.Module, path: str | os.PathLike) -> None:
    """Copy every weight whose name and shape match (heads for another label set are skipped)."""
    checkpoint = load_checkpoint(path)
    own = network.state_dict()
    usable = {k: v for k, v in checkpoint["network"].items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise CheckpointError(
            f"{path}: no weight of this checkpoint fits the network ({len(own)} tensors expected); "
            "pretrain with the same architecture and topology"
        )
    network.load_state_dict(usable, strict=False)
    log.info("pretrained weights: %d of %d tensors loaded from %s", len(usable), len(own), path)


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


# ------------------------------------------------------------------------------------------------- step
def _targets_to(device: torch.device, targets: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.to(device, non_blocking=True) for t in targets]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def pseudo_dice_counts(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[3, K-1]`` true positives, false positives, false negatives per foreground class of the argmax
    prediction of ``logits [B, K, *S]`` against ``target [B, 1, *S]`` (summed over the batch)."""
    prediction = logits.argmax(1)
    labels = target[:, 0].long()
    counts = torch.zeros(3, num_classes - 1, dtype=torch.float64, device=logits.device)
    for k in range(1, num_classes):
        p, g = prediction == k, labels == k
        counts[0, k - 1] = (p & g).sum()
        counts[1, k - 1] = (p & ~g).sum()
        counts[2, k - 1] = (~p & g).sum()
    return counts


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else 0.0


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
    checkpoint_every: int = CHECKPOINT_EVERY,
    checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
    validation_iterations: int | None = None,
    on_epoch_end: Callable[[int, Curves], None] | None = None,
) -> Path:
    """Train one fold of one configuration; returns the fold folder (see docs/training.md).

    ``None`` for ``seed``, ``selfreg``, ``epochs``, ... means "not given": the default for a new run, the
    run's own value (run.json) for ``continue_training``. ``force`` deletes an earlier run's files first.
    Keyword-only extras: ``checkpoint_every`` (epochs between checkpoint_latest.pt), ``checkpoint_interval_s``
    (also save latest when this much time passed, checked every iteration), ``validation_iterations`` per
    epoch (default 1/5 of the training iterations), ``on_epoch_end(epoch, curves)`` callback (notebooks, tests).
    """
    session_start = time.monotonic()
    if epochs is not None and epochs < 1 or iterations_per_epoch is not None and iterations_per_epoch < 1:
        raise ConfigurationError(f"--epochs and --iters-per-epoch must be >= 1, got {epochs} and {iterations_per_epoch}")
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
                 "pretrained": str(pretrained) if pretrained is not None else None, "num_workers": num_workers}
        options, notes, resuming = _run_options(output, given, continue_training)
        distributed.barrier(context)  # every rank has read the folder before rank 0 changes it
        run = RunOptions(dataset=location.name, configuration=config.name, architecture=arch, fold=str(fold),
                         epochs=options["epochs"], iterations_per_epoch=options["iterations_per_epoch"],
                         time_budget_s=options["time_budget_s"],
                         seed=DEFAULT_SEED if options["seed"] is None else int(options["seed"]),
                         selfreg=bool(options["selfreg"]), pretrained=options["pretrained"],
                         num_workers=DEFAULT_WORKERS if options["num_workers"] is None else int(options["num_workers"]),
                         device=torch_device.type, started=now_iso())
        _on_main(context, torch_device,
                 lambda: notes.extend(_prepare_folder(output, run, continue_training, resuming, force, command)))
        try:
            return _train_fold(
                location, plans, config, fold, train_ids, val_ids, store, output, run, notes, command,
                torch_device, context, session_start, continue_training and resuming, compile_network, validate,
                checkpoint_every, checkpoint_interval_s, validation_iterations, on_epoch_end,
            )
        except KeyboardInterrupt:
            # outside the loop (setup, validation) or from a callback: no chance to save, say what exists
            raise _interrupted(output, command, "interrupted", signal.SIGINT) from None


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


def _interrupted(output: Path, command: str, what: str, signum: int) -> TrainingInterrupted:
    """The message of a stopped run: the resume command only when there is a checkpoint to resume from."""
    for name in (LATEST, FINAL):
        if (output / name).is_file():
            return TrainingInterrupted(
                f"{output}: {what}; {name} is saved: resume with `{command} --continue`", 128 + int(signum))
    return TrainingInterrupted(
        f"{output}: {what} before a resumable checkpoint was saved; run `{command} --continue` to start that run again "
        f"with its options ({RUN_FILE})", 128 + int(signum))


class _StopRequest:
    """SIGINT/SIGTERM during training (Ctrl-C, a cluster's pre-emption, which sends SIGTERM and kills a little
    later): remembered by the handler, acted on by the loop at the next iteration boundary (save
    checkpoint_latest.pt, then stop), since a checkpoint cannot be written from inside a signal handler. A second
    Ctrl-C stops at once. Handlers can only be set in the main thread; elsewhere (a notebook's worker thread)
    the default behaviour stays."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        os.write(2, f"{signal.Signals(signum).name}: saving {LATEST} after this iteration, then stopping "
                    "(Ctrl-C again stops at once, without saving)\n".encode())

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _train_fold(location, plans, config, fold, train_ids, val_ids, store, output, run: RunOptions, notes, command,
                torch_device, context, session_start, load_checkpoint_state, compile_network, validate,
                checkpoint_every, checkpoint_interval_s, validation_iterations, on_epoch_end) -> Path:
    """The run itself, inside the fold lock, with run.json written."""
    arch = config.architecture.name
    epochs, iterations_per_epoch, budget_s = run.epochs, run.iterations_per_epoch, run.time_budget_s
    seed, selfreg, workers = run.seed, run.selfreg, run.num_workers
    # with a time budget the budget ends training; --epochs then is an upper bound only
    total_epochs = epochs if epochs is not None else (None if budget_s else DEFAULT_EPOCHS)
    if torch_device.type == "cpu":
        configure_threads(training_threads(workers))
    else:
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest kernels
    log_file = output / "log.txt"

    def say(message: str) -> None:
        if context.is_main:
            log.info(message)
            append_log(log_file, message)

    for note in notes:
        say(note)
    if context.is_main:
        write_json(output / "plans.json", plans.to_json())
        write_json(output / "environment.json", _environment(torch_device, context))

    seed_everything(seed + context.rank)
    previous_stage = None
    if config.previous_stage:
        # a cascade's extra inputs: the previous stage's cross-validation predictions on this grid
        # (cascade.py); converted once by the main process, which the other ranks wait for
        cases = sorted(set(train_ids) | set(val_ids))
        if context.is_main:
            prepare_previous_stage(location, plans, config, store, load_splits(location.preprocessed), cases, say)
        distributed.barrier(context)
        previous_stage = previous_stage_folder(location, plans, config)
    cascade_classes = plans.num_classes if previous_stage is not None else 0

    # --time-budget: adapt the network/batch/precision/epoch length to what the budget can buy (budget.py);
    # --continue reuses the adapted configuration stored in the checkpoint so its weights fit
    budget_choice, budget_reasons = BudgetChoice(), []
    if budget_s:
        resumed = _resumed_configuration(output) if load_checkpoint_state else None
        if resumed is not None:
            config, budget_choice, budget_reasons = resumed
        else:
            config, budget_reasons, budget_choice = adapt_to_budget(
                config, budget_s, torch_device,
                seconds_per_iteration=lambda c, autocast: _measure_step(plans, c, torch_device, autocast),
                num_threads=torch.get_num_threads() if torch_device.type == "cpu" else None)
        for reason in budget_reasons:
            say(f"time budget {format_duration(budget_s)}: {reason}")  # console and log.txt
    iterations = iterations_per_epoch or budget_choice.iterations_per_epoch or DEFAULT_ITERATIONS
    val_iterations = validation_iterations or max(1, round(iterations * VALIDATION_FRACTION))

    network = build_network(plans, config)
    info_selfreg = None
    if selfreg:
        from autoseg import networks

        if not networks.get(arch).supports_selfreg:
            raise ConfigurationError(
                f"--selfreg: architecture '{arch}' does not expose its decoder features; use it with a U-Net "
                f"that does ({', '.join(n for n in networks.available() if networks.get(n).supports_selfreg)})"
            )
        from autoseg.networks.selfreg import selfreg_loss

        info_selfreg = selfreg_loss
    if run.pretrained and not load_checkpoint_state:
        _load_pretrained(network, run.pretrained)
    network.to(torch_device)
    optimizer = torch.optim.SGD(network.parameters(), lr=INITIAL_LR, momentum=MOMENTUM, nesterov=True,
                                weight_decay=WEIGHT_DECAY)
    state = TrainingState()
    if load_checkpoint_state:
        state = _resume(output, network, optimizer, say)
    if budget_s:
        state.budget_choice, state.budget_reasons = budget_choice.to_json(), list(budget_reasons)
    dtype = amp_dtype(torch_device)
    if torch_device.type == "cpu" and budget_choice.autocast == "bfloat16":
        dtype = torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    model: nn.Module = network
    if context.enabled:
        # the lowest deep-supervision head has loss weight 0 (reference), so its parameters get no gradient:
        # DDP must be told, or it waits for them forever
        model = nn.parallel.DistributedDataParallel(
            network, device_ids=[torch_device.index] if torch_device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    if compile_network:
        model = torch.compile(model)

    # data: enlarged patches -> augmentation -> centre crop; deep-supervision targets at the network's scales
    # (SegmentationNetwork protocol: without deep supervision one full-resolution scale of weight 1)
    dims = config.dims
    ds_scales, ds_weights = list(network.ds_scales), list(network.ds_weights)
    settings = augmentation_settings(config.patch_size)
    batch_size = distributed.split_batch(config.batch_size, context)
    train_sampler = PatchSampler(store, distributed.shard(train_ids, context),
                                 sample_size_for(config.patch_size, settings), batch_size, dims,
                                 previous_stage=previous_stage)
    train_loader = BatchLoader(train_sampler,
                               training_transforms(config.patch_size, settings, ds_scales,
                                                   cascade_classes=cascade_classes),
                               num_workers=workers, seed=(seed, context.rank), pin_memory=torch_device.type == "cuda",
                               start_iteration=state.iterations_done)
    val_sampler = PatchSampler(store, distributed.shard(val_ids, context), config.patch_size, batch_size, dims,
                               previous_stage=previous_stage)
    val_transforms = validation_transforms(ds_scales, cascade_classes)
    batch_dice = dims == 2  # reference: batch Dice for 2D configurations
    class_names = [name for name, value in sorted(plans.labels.items(), key=lambda kv: kv[1]) if value > 0]

    budget_desc = f", time budget {format_duration(budget_s)}" if budget_s else ""
    say(f"training {location.name} {config.name} ({arch}) fold {fold}: {len(train_ids)} train / {len(val_ids)} val "
        f"cases, patch {config.patch_size}, batch {config.batch_size}, {total_epochs or 'unlimited'} epochs x "
        f"{iterations} iterations, device {torch_device}{', AMP ' + str(dtype) if dtype else ''}"
        f"{budget_desc}, world size {context.world_size}")
    validation_estimate = _ValidationEstimate(store, val_ids, config, validate, budget_s)
    if budget_s and state.seconds_per_patch is None:
        # size the final-validation reserve from the start, not from a 10 % guess
        state.seconds_per_patch = _measure_forward(network, config, plans.network_in_channels(config),
                                                   torch_device, dtype)
    last_save = time.monotonic()
    stop_reason = None
    stop = _StopRequest()
    bar = None
    last_step_s = 0.0
    session_steps, timing_start = 0, 0.0  # for the duration estimate of a long CPU run

    def elapsed() -> float:
        return state.elapsed_s + (time.monotonic() - session_start)

    def budget_left(iterations_this_epoch: int = 0) -> float:
        """Seconds of training left: budget - time used - reserve for the final checkpoint + validation
        - the validation phase this epoch still owes (1/5 of its iterations, forward only)."""
        if not budget_s:
            return math.inf
        owed = _epoch_validation_iterations(iterations_this_epoch, val_iterations, True) * batch_size \
            * (state.seconds_per_patch or 0.0) * VALIDATION_OVERHEAD if iterations_this_epoch else 0.0
        return budget_s - validation_estimate.reserve(state) - owed - elapsed()

    def validation_deadline() -> float | None:
        """time.monotonic() by which an epoch's validation must stop to keep the final reserve."""
        if not budget_s:
            return None
        return session_start + budget_s - state.elapsed_s - validation_estimate.reserve(state)

    def save_latest() -> None:
        nonlocal last_save
        if context.is_main:
            _save(output / LATEST, network, optimizer, state, plans, config, fold, location.name, selfreg, seed,
                  total_epochs, iterations, budget_s, elapsed())
        last_save = time.monotonic()

    try:
        stop.__enter__()
        while True:
            if total_epochs is not None and state.epoch >= total_epochs:
                break
            if distributed.broadcast_flag(budget_left() <= 0, context, torch_device):
                stop_reason = "time budget"
                break
            epoch = state.epoch
            epoch_start = time.monotonic()
            # a checkpoint saved mid-epoch resumes at its iteration, with the RNG states it saved
            first_iteration, losses = state.epoch_iteration, list(state.epoch_losses)
            state.epoch_iteration, state.epoch_losses = 0, []
            if first_iteration == 0:
                seed_everything(_epoch_seed(seed, epoch, context.rank, 1))
            model.train()
            lr = INITIAL_LR
            done = first_iteration
            bar = iteration_bar(epoch, total_epochs, iterations, first_iteration, context.is_main)
            for iteration in range(first_iteration, iterations):
                # iteration boundary: a signal saves and stops here; and checkpoint_latest every few minutes
                stopping = distributed.broadcast_flag(stop.signum is not None, context, torch_device) \
                    if context.enabled else stop.signum is not None
                if stopping or time.monotonic() - last_save >= checkpoint_interval_s:
                    state.epoch_iteration, state.epoch_losses = iteration, list(losses)
                    save_latest()
                    state.epoch_iteration, state.epoch_losses = 0, []
                if stopping:
                    signum = stop.signum or signal.SIGTERM
                    raise _interrupted(output, command, f"{signal.Signals(signum).name} at epoch {epoch} iteration "
                                       f"{iteration}", signum)
                # the clock is checked every iteration: a budget ends mid-epoch (step time known from the
                # previous iteration, so the check is "would one more step still fit")
                if budget_s and distributed.broadcast_flag(budget_left(iteration + 1) - last_step_s <= 0, context,
                                                           torch_device):
                    stop_reason = "time budget"
                    break
                progress = training_progress(epoch, total_epochs, elapsed() if budget_s else None, budget_s)
                lr = poly_lr(INITIAL_LR, progress)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_start = time.monotonic()
                batch = next(train_loader)
                loss = _train_step(model, optimizer, scaler, batch, torch_device, dtype, ds_weights, batch_dice,
                                   info_selfreg, epoch, iteration, output)
                losses.append(loss)
                done += 1
                state.iterations_done += 1
                last_step_s = time.monotonic() - step_start
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                session_steps += 1
                if session_steps == 1:  # the first step warms up (allocator, oneDNN caches): time the next 3
                    timing_start = time.monotonic()
                elif session_steps == 4 and torch_device.type == "cpu" and not budget_s and total_epochs:
                    warning = duration_warning((time.monotonic() - timing_start) / 3,
                                               total_epochs * iterations - state.iterations_done)
                    if warning:
                        say(warning)
            bar.close()
            if not done:  # the budget ended before this epoch's first step
                break
            val_loss, dice = _validate_epoch(model, val_sampler, val_transforms,
                                             _epoch_validation_iterations(done, val_iterations, bool(budget_s)),
                                             torch_device, dtype, ds_weights, batch_dice, plans.num_classes, context,
                                             np.random.default_rng(_epoch_seed(seed, epoch, context.rank, 3)), state,
                                             validation_deadline())
            train_loss = float(np.mean(losses)) if losses else float("nan")
            if context.enabled:
                pair = distributed.all_reduce_sum(torch.tensor([train_loss, val_loss], device=torch_device), context)
                train_loss, val_loss = (pair / context.world_size).tolist()
            mean_dice = _finite_mean(dice)
            state.ema = mean_dice if state.ema is None else EMA_DECAY * state.ema + (1 - EMA_DECAY) * mean_dice
            state.epoch = epoch + 1
            state.curves.append(state.epoch, train_loss, val_loss, dice, lr, time.monotonic() - epoch_start, state.ema)
            if context.is_main:
                _after_epoch(output, state, network, optimizer, plans, config, fold, location.name, selfreg, seed,
                             total_epochs, iterations, budget_s, class_names, say, elapsed)
                if state.ema > state.best_ema:
                    state.best_ema = state.ema
                    _save(output / BEST, network, optimizer, state, plans, config, fold, location.name, selfreg,
                          seed, total_epochs, iterations, budget_s, elapsed())
                    say(f"new best EMA pseudo-Dice {state.ema:.4f}: {BEST}")
            if state.epoch % max(1, checkpoint_every) == 0 or time.monotonic() - last_save >= checkpoint_interval_s:
                save_latest()
            if on_epoch_end is not None:
                on_epoch_end(state.epoch, state.curves)
            if stop_reason:
                break
    except torch.OutOfMemoryError as exc:
        raise TrainingError(
            f"{output}: the GPU ran out of memory with patch {config.patch_size} and batch {config.batch_size}; "
            f"re-plan with a smaller budget (`autoseg plan {location.name} --gpu-memory <GB below your GPU's>`) "
            "and train again"
        ) from exc
    finally:
        stop.__exit__()
        if bar is not None:
            bar.close()
        train_loader.close()

    if stop_reason:
        say(f"stopping after epoch {state.epoch}: {stop_reason} ({format_duration(elapsed())} used of "
            f"{format_duration(budget_s or 0)})")
    if context.is_main:
        for name in (FINAL, LATEST):
            _save(output / name, network, optimizer, state, plans, config, fold, location.name, selfreg, seed,
                  total_epochs, iterations, budget_s, elapsed())
        say(f"training done: {state.epoch} epochs in {format_duration(elapsed())}; {FINAL} written")
        if validate:
            mirror = validation_estimate.use_mirroring(state, budget_s, elapsed())
            _final_validation(output, location, plans, config, store, val_ids, torch_device, mirror, say,
                              previous_stage)
        say(f"total time {format_duration(elapsed())}")
        _record_elapsed(output, elapsed(), budget_s)
    if context.enabled:
        # DDP's reducer holds the process group; left to the garbage collector it can outlive
        # destroy_process_group into interpreter teardown, where gloo's worker threads must not be joined
        model = None
        gc.collect()
    distributed.barrier(context)
    distributed.shutdown(context)
    return output


def _train_step(model, optimizer, scaler, batch, device, dtype, ds_weights, batch_dice, selfreg_fn, epoch,
                iteration, output) -> float:
    data = batch["data"].to(device, non_blocking=True)
    targets = _targets_to(device, batch["target"])
    if not torch.isfinite(data).all():
        raise TrainingError(
            f"{output}: the training batch of epoch {epoch} iteration {iteration} contains NaN/Inf intensities "
            f"(cases {', '.join(batch.get('keys', []))}); re-run `autoseg preprocess` for them; the last good "
            f"checkpoint ({LATEST}) is kept"
        )
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, dtype):
        if selfreg_fn is not None:
            outputs, features = model(data, return_features=True)
        else:
            outputs = model(data)
        loss = deep_supervision_loss(outputs, targets, batch_dice, ds_weights)
        if selfreg_fn is not None:
            loss = loss + selfreg_fn(features)
    if not torch.isfinite(loss):
        raise TrainingError(
            f"{output}: the loss became {loss.item()} at epoch {epoch} iteration {iteration}; training stopped and "
            f"the last good checkpoint ({LATEST}) is kept. Check the preprocessed data, or resume with --continue "
            "(a different random stream often avoids a rare instability)"
        )
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP)
        optimizer.step()
    return float(loss.detach())


def _epoch_validation_iterations(done: int, planned: int, budgeted: bool) -> int:
    """Validation iterations after ``done`` training iterations: the planned count, or under a budget (where
    an epoch may end early) 1/5 of the iterations actually done, at most the planned count."""
    if not budgeted:
        return planned
    return max(1, min(planned, round(done * VALIDATION_FRACTION)))


def _validate_epoch(model, sampler, transforms, iterations, device, dtype, ds_weights, batch_dice, num_classes,
                    context, rng, state, deadline: float | None = None) -> tuple[float, list[float]]:
    """Loss and pseudo-Dice on random validation patches (no augmentation); also measures the forward time
    per patch, which sizes the time reserved for the final validation under --time-budget. With a
    ``deadline`` (time.monotonic()) it stops after the first batch that ends past it."""
    model.eval()
    losses, counts = [], torch.zeros(3, num_classes - 1, dtype=torch.float64, device=device)
    forward_time, patches = 0.0, 0
    with torch.no_grad():
        for _ in range(iterations):
            batch = transforms(**sampler.sample_batch(rng))
            data = torch.from_numpy(batch["data"]).to(device)
            targets = [torch.from_numpy(t).to(device) for t in batch["target"]]
            start = time.monotonic()
            with _autocast(device, dtype):
                outputs = model(data)
            forward_time += time.monotonic() - start
            patches += data.shape[0]
            losses.append(float(deep_supervision_loss(outputs, targets, batch_dice, ds_weights)))
            first = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
            counts += pseudo_dice_counts(first, targets[0], num_classes)
            if deadline is not None and time.monotonic() >= deadline:
                break
    distributed.all_reduce_sum(counts, context)
    if patches:
        state.seconds_per_patch = forward_time / patches
    # per foreground class; NaN for a class absent from every batch (left out of the mean by _finite_mean)
    return float(np.mean(losses)), [dice_from_counts(tp, fp, fn) for tp, fp, fn in zip(*counts.tolist())]


# ------------------------------------------------------------------------------------- checkpoints/state
def _metadata(state, plans, config, fold, dataset_name, selfreg, seed, epochs, iterations, budget_s,
              elapsed_s) -> CheckpointMetadata:
    return CheckpointMetadata(
        dataset_name=dataset_name, configuration=asdict(config), plans=plans.to_json(), fold=fold,
        epoch=state.epoch, architecture=config.architecture.name,
        in_channels=plans.network_in_channels(config),
        num_classes=plans.num_classes, selfreg=bool(selfreg), curves=state.curves.to_json(),
        ema_pseudo_dice=state.ema, best_ema_pseudo_dice=state.best_ema, elapsed_s=float(elapsed_s),
        seconds_per_patch=state.seconds_per_patch, seed=seed, epochs=epochs,
        iterations_per_epoch=iterations, time_budget_s=budget_s, iterations_done=state.iterations_done,
        budget_choice=state.budget_choice, budget_reasons=state.budget_reasons,
        epoch_iteration=state.epoch_iteration, epoch_losses=list(state.epoch_losses),
    )


def _save(path, network, optimizer, state, plans, config, fold, dataset_name, selfreg, seed, epochs, iterations,
          budget_s, elapsed_s) -> None:
    metadata = _metadata(state, plans, config, fold, dataset_name, selfreg, seed, epochs, iterations, budget_s,
                         elapsed_s)
    scheduler = {"kind": "poly", "initial_lr": INITIAL_LR, "exponent": 0.9, "epochs": epochs,
                 "time_budget_s": budget_s, "elapsed_s": float(elapsed_s)}
    save_checkpoint(make_checkpoint(network.state_dict(), metadata, optimizer.state_dict(), scheduler,
                                    capture_rng_state()), path)


def _resume(output: Path, network: nn.Module, optimizer, say) -> TrainingState:
    """Load checkpoint_latest.pt (else final) into network/optimiser; a missing one starts fresh with a
    warning (a resubmitted cluster job may not have saved yet), a corrupted one is an error."""
    for name in (LATEST, FINAL):
        path = output / name
        if path.is_file():
            break
    else:  # _run_options decided there is a checkpoint; it vanished since
        raise CheckpointError(f"{output / LATEST}: disappeared while training started; run the command again")
    checkpoint = load_checkpoint(path)
    try:
        network.load_state_dict(checkpoint["network"])
        if checkpoint.get("optimizer"):
            optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: its weights do not fit this configuration's network ({str(exc).splitlines()[0][:200]}); "
            "it belongs to another plan: delete the fold folder to retrain, or train without --continue"
        ) from exc
    if checkpoint.get("rng"):
        restore_rng_state(checkpoint["rng"])
    metadata = CheckpointMetadata.from_json(checkpoint["metadata"], path)
    state = TrainingState(
        epoch=int(metadata.epoch or 0), curves=Curves.from_json(metadata.curves),
        ema=metadata.ema_pseudo_dice, best_ema=float(metadata.best_ema_pseudo_dice),
        elapsed_s=float(metadata.elapsed_s), seconds_per_patch=metadata.seconds_per_patch,
        iterations_done=int(metadata.iterations_done or 0), budget_choice=metadata.budget_choice,
        budget_reasons=list(metadata.budget_reasons or []),
        epoch_iteration=int(metadata.epoch_iteration or 0),
        epoch_losses=[float(v) for v in metadata.epoch_losses or []],
    )
    within = f" (iteration {state.epoch_iteration} of epoch {state.epoch})" if state.epoch_iteration else ""
    say(f"resumed from {path.name}: epoch {state.epoch}{within}, {format_duration(state.elapsed_s)} of training "
        "time used")
    return state


def _after_epoch(output, state, network, optimizer, plans, config, fold, dataset_name, selfreg, seed, epochs,
                 iterations, budget_s, class_names, say, elapsed) -> None:
    curves = state.curves
    if budget_s:
        eta = format_duration(max(0.0, budget_s - elapsed()))
    elif epochs:
        recent = curves.epoch_time[-5:]
        eta = format_duration(float(np.mean(recent)) * (epochs - state.epoch))
    else:
        eta = "?"
    print_epoch_line(epoch_line(state.epoch, epochs, curves, class_names, eta), output / "log.txt")
    write_curves(curves, output / "training_log.json")
    try:
        plot_progress(curves, output / "progress.png", class_names)
    except Exception as exc:  # a plotting failure must never stop training
        log.warning("could not draw progress.png: %s", exc)


def _record_elapsed(output: Path, elapsed_s: float, budget_s: float | None) -> None:
    write_json(output / "timing.json", {"elapsed_s": float(elapsed_s), "time_budget_s": budget_s})


# ------------------------------------------------------------------------------------ final validation
class _ValidationEstimate:
    """How much of a --time-budget to keep for the final checkpoint and the validation prediction.

    Estimate = number of sliding windows (step 0.5) over the validation cases x measured forward time per
    patch x mirror passes (2^dims), x 1.5 for resampling/writing, + PER_CASE_OVERHEAD_S per case (~0.5 s measured per Hippocampus case). Mirroring is dropped when
    it would take more than a quarter of the budget; before the first measurement 10 % of the budget is kept.
    """

    def __init__(self, store: Path, val_ids: list[str], config: Configuration, validate: bool,
                 budget_s: float | None) -> None:
        self.validate, self.budget_s, self.dims = validate, budget_s, config.dims
        self.windows = 0
        if validate and budget_s:
            from autoseg.preprocessing.store import load_properties

            for case_id in val_ids:
                shape = load_properties(store, case_id).shape_after_resampling
                spatial = shape[-config.dims:]
                count = int(np.prod([max(1, math.ceil((max(s, p) - p) / (p * 0.5)) + 1)
                                     for s, p in zip(spatial, config.patch_size)]))
                if config.dims == 2:
                    count *= int(shape[0])
                self.windows += count
        self.cases = len(val_ids)

    def _seconds(self, state: TrainingState, mirror: bool) -> float | None:
        if state.seconds_per_patch is None:
            return None
        passes = 2**self.dims if mirror else 1
        return self.windows * state.seconds_per_patch * passes * 1.5 + PER_CASE_OVERHEAD_S * self.cases

    def use_mirroring(self, state: TrainingState, budget_s: float | None, elapsed_s: float) -> bool:
        if not budget_s:
            return True
        seconds = self._seconds(state, True)
        return seconds is not None and seconds <= 0.25 * budget_s and seconds <= budget_s - elapsed_s

    def reserve(self, state: TrainingState) -> float:
        if not self.budget_s:
            return 0.0
        checkpoint_time = 1.0 + 0.01 * self.budget_s
        if not self.validate:
            return checkpoint_time
        measured = self._seconds(state, self.use_mirroring(state, self.budget_s, 0.0))
        if measured is None:
            return 0.1 * self.budget_s
        return min(0.5 * self.budget_s, measured + checkpoint_time)


def _resumed_configuration(output: Path) -> tuple[Configuration, BudgetChoice, list[str]] | None:
    """The adapted configuration and budget choice of the checkpoint --continue will load (None: no checkpoint
    or not a budget run), so a resumed budget run rebuilds the same network."""
    for name in (LATEST, FINAL):
        if (output / name).is_file():
            metadata = CheckpointMetadata.from_json(load_checkpoint(output / name)["metadata"], output / name)
            if not metadata.budget_choice:
                return None
            choice = BudgetChoice(**metadata.budget_choice)
            reasons = [f"resumed: {r}" for r in metadata.budget_reasons or []]
            return metadata.parsed_configuration(), choice, reasons
    return None


def _random_batch(network: nn.Module, config: Configuration, in_channels: int, num_classes: int, batch_size: int):
    scales = list(network.ds_scales)  # the SegmentationNetwork protocol's, with or without deep supervision
    generator = torch.Generator().manual_seed(0)
    data = torch.randn((batch_size, in_channels, *config.patch_size), generator=generator)
    targets = [torch.randint(0, num_classes, (batch_size, 1, *[max(1, round(p * f)) for p, f in
                                                                zip(config.patch_size, scale)]),
                             generator=generator).float() for scale in scales]
    return {"data": data, "target": targets, "keys": []}


def _measure_step(plans: Plans, config: Configuration, device: torch.device, autocast: str | None) -> float:
    """Seconds of one training step (forward, loss, backward, clip, SGD) of ``config``'s network at its
    batch on random data: one warm-up step (allocator, oneDNN primitive cache), then the faster of two."""
    network = build_network(plans, config).to(device)
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    dtype = getattr(torch, autocast) if autocast else amp_dtype(device)
    batch = _random_batch(network, config, plans.network_in_channels(config), plans.num_classes, config.batch_size)
    weights = list(network.ds_weights)
    times = []
    for i in range(3):
        start = time.monotonic()
        _train_step(network, optimizer, None, batch, device, dtype, weights, config.dims == 2, None, 0, i, Path("."))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.monotonic() - start)
    return min(times[1:])


def _measure_forward(network: nn.Module, config: Configuration, in_channels: int, device: torch.device,
                     dtype: torch.dtype | None) -> float:
    """Seconds of one inference forward pass of one patch (the faster of two after a warm-up)."""
    was_training = network.training
    network.eval()
    data = torch.randn((1, in_channels, *config.patch_size), device=device)
    times = []
    with torch.no_grad(), _autocast(device, dtype):
        for _ in range(3):
            start = time.monotonic()
            network(data)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.monotonic() - start)
    network.train(was_training)
    return min(times[1:])


def _final_validation(output, location, plans, config, store, val_ids, device, mirror, say,
                      previous_stage: Path | None = None) -> None:
    """Predict each validation case from the store with the final checkpoint, write it in the original
    geometry with its probabilities, and evaluate against raw labelsTr. Glue around inference/evaluation.
    A cascade's network also gets the previous stage's cross-validation prediction of the case."""
    from autoseg.inference import Predictor
    from autoseg.inference.predictor import foreground_one_hot
    from autoseg.io import write_segmentation
    from autoseg.preprocessing import restore_probabilities
    from autoseg.preprocessing.store import load_case

    validation = output / "validation"
    validation.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_checkpoints([output / FINAL], device=device, mirror=mirror)
    label_values = np.array([v for _, v in sorted(plans.labels.items(), key=lambda kv: kv[1])])
    start = time.monotonic()
    for case_id in val_ids:
        data, _, properties = load_case(store, case_id)
        data = np.array(data, dtype=np.float32)
        if previous_stage is not None:
            previous = load_previous_stage(previous_stage, case_id)[0]
            data = np.concatenate([data, foreground_one_hot(previous, plans.num_classes)], axis=0)
        probabilities = predictor.predict_preprocessed(data)
        restored = restore_probabilities(probabilities, properties, config)
        segmentation = label_values[np.argmax(restored, axis=0)].astype(np.uint8)
        write_segmentation(segmentation, properties.geometry, validation / f"{case_id}{plans.file_ending}")
        with atomic_path(validation / f"{case_id}.npz", suffix=".npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, probabilities=restored.astype(np.float16))
    say(f"validation: {len(val_ids)} case(s) predicted in {format_duration(time.monotonic() - start)}"
        f"{'' if mirror else ' (mirroring off to fit the time budget)'}")
    reference = location.raw / "labelsTr"
    if not reference.is_dir():
        say(f"validation: {reference} not found; metrics skipped (run `autoseg evaluate` once labels are there)")
        return
    from autoseg.evaluation import evaluate_folders

    summary = evaluate_folders(validation, reference, file_ending=plans.file_ending, case_ids=val_ids)
    mean = getattr(summary, "mean", None)
    say(f"validation metrics: {json.dumps(mean, default=str)[:500]}")
