"""The trainer's parts, built from the plan and the run's options by one function: :func:`build_parts`.

A part is chosen, never switched on by name in the loop: the network comes from the architecture registry
(autoseg.networks), the loss from the loss registry (losses.py, ``--loss``), the learning-rate schedule from
the schedule registry (schedule.py, ``--lr-schedule``), the time policy from budget.py's clock. The loop
(loop.py) only calls them.

Optimiser: SGD with Nesterov momentum 0.99, weight decay 3e-5, learning rate set by the schedule each
iteration (the nnU-Net method, Isensee et al., Nature Methods 2021); gradient norm clipped at 12 (loop.py).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from autoseg.contracts.checkpoint import load_checkpoint
from autoseg.contracts.plans import Configuration, Plans
from autoseg.device import amp_dtype
from autoseg.errors import CheckpointError, ConfigurationError, reraised_as
from autoseg.training import distributed
from autoseg.training.augmentation import (
    augmentation_settings,
    sample_size_for,
    training_transforms,
    validation_transforms,
)
from autoseg.training.budget import (
    VALIDATION_FRACTION,
    BudgetChoice,
    BudgetClock,
    FinalValidationReserve,
    adapt_to_budget,
)
from autoseg.training.data import PatchSampler
from autoseg.training.job import FoldJob
from autoseg.training.loader import BatchLoader
from autoseg.training.losses import DEFAULT_LOSS, LossContext, LossFn, build_loss
from autoseg.training.schedule import DEFAULT_SCHEDULE, Schedule, build_schedule, format_duration
from autoseg.training.state import TrainingState

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 1000  # reference
DEFAULT_ITERATIONS = 250  # iterations per epoch (reference)
MOMENTUM = 0.99
WEIGHT_DECAY = 3e-5


@dataclass
class TrainerParts:
    """Everything the loop needs, built once per run.

    ``network`` holds the weights (checkpoints save it); ``model`` is what runs forward and backward: the
    network itself, or its DDP / torch.compile wrapper. ``ds_scales`` / ``ds_weights``: per network output,
    its scale relative to the patch and its loss weight (the network's own, deep supervision off: one output).
    """

    network: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    loss: LossFn
    ds_weights: list[float]
    selfreg: Callable[[Any], torch.Tensor] | None
    dtype: torch.dtype | None
    scaler: Any  # torch.amp.GradScaler for float16 AMP, else None
    train_loader: BatchLoader
    val_sampler: PatchSampler
    val_transforms: Callable[..., dict[str, Any]]
    clock: BudgetClock
    configuration: Configuration  # the plan's, or the one --time-budget adapted
    iterations: int  # training iterations per epoch
    total_epochs: int | None  # None: the budget ends training

    def close(self) -> None:
        self.train_loader.close()


# ---------------------------------------------------------------------------------------------- network
def build_network(plans: Plans, config: Configuration) -> nn.Module:
    from autoseg import networks

    with reraised_as(ConfigurationError, networks.NetworkError):  # the one-line message users know
        return networks.build(config.architecture.network_spec(plans.network_in_channels(config), plans.num_classes))


def deep_supervision_of(network: nn.Module) -> tuple[list[tuple[float, ...]], list[float]]:
    """(scales, loss weights) of the network's outputs: the SegmentationNetwork protocol's, with or without
    deep supervision (without: one full-resolution output, weight 1)."""
    return list(network.ds_scales), list(network.ds_weights)


def load_pretrained(network: nn.Module, path: str | os.PathLike) -> None:
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


def selfreg_loss_for(architecture: str) -> Callable[[Any], torch.Tensor]:
    """The SelfReg loss (networks.selfreg) for a network that exposes its decoder features."""
    from autoseg import networks

    if not networks.get(architecture).supports_selfreg:
        raise ConfigurationError(
            f"--selfreg: architecture '{architecture}' does not expose its decoder features; use it with a U-Net "
            f"that does ({', '.join(n for n in networks.available() if networks.get(n).supports_selfreg)})"
        )
    from autoseg.networks.selfreg import selfreg_loss

    return selfreg_loss


def make_optimizer(network: nn.Module, initial_lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(network.parameters(), lr=initial_lr, momentum=MOMENTUM, nesterov=True,
                           weight_decay=WEIGHT_DECAY)


def loss_context(plans: Plans, config: Configuration) -> LossContext:
    # reference: batch Dice for 2D configurations (their patches are thin slices of one case)
    return LossContext(dims=config.dims, num_outputs=plans.num_classes, batch_dice=config.dims == 2)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------ the budget
def budget_configuration(job: FoldJob, resumed: tuple[Configuration, BudgetChoice, list[str]] | None,
                         loss_name: str) -> tuple[Configuration, BudgetChoice, list[str]]:
    """The configuration to train: the plan's, or under --time-budget the one adapted to what the budget can
    buy (budget.py); ``resumed`` (a --continue of a budget run) keeps the adapted one its weights fit."""
    budget_s = job.run.time_budget_s
    if not budget_s:
        return job.config, BudgetChoice(), []
    if resumed is not None:
        return resumed
    config, reasons, choice = adapt_to_budget(
        job.config, budget_s, job.device,
        seconds_per_iteration=lambda c, cast: measure_step(job.plans, c, job.device, cast, loss_name),
        num_threads=torch.get_num_threads() if job.device.type == "cpu" else None)
    return config, choice, reasons


def random_batch(network: nn.Module, config: Configuration, in_channels: int, num_classes: int,
                 batch_size: int) -> dict[str, Any]:
    """A batch of random data and labels at the network's output scales (for timing a step)."""
    scales, _ = deep_supervision_of(network)
    generator = torch.Generator().manual_seed(0)
    data = torch.randn((batch_size, in_channels, *config.patch_size), generator=generator)
    targets = [torch.randint(0, num_classes, (batch_size, 1, *[max(1, round(p * f)) for p, f in
                                                                zip(config.patch_size, scale)]),
                             generator=generator).float() for scale in scales]
    return {"data": data, "target": targets, "keys": []}


def measure_step(plans: Plans, config: Configuration, device: torch.device, cast: str | None,
                 loss_name: str = DEFAULT_LOSS, now: Callable[[], float] = time.monotonic) -> float:
    """Seconds of one training step (forward, loss, backward, clip, SGD) of ``config``'s network at its
    batch on random data: one warm-up step (allocator, oneDNN primitive cache), then the faster of two."""
    from autoseg.training.loop import train_step

    network = build_network(plans, config).to(device)
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    dtype = getattr(torch, cast) if cast else amp_dtype(device)
    batch = random_batch(network, config, plans.network_in_channels(config), plans.num_classes, config.batch_size)
    _, weights = deep_supervision_of(network)
    parts = StepParts(network, optimizer, build_loss(loss_name, loss_context(plans, config)), weights, dtype)
    times = []
    for i in range(3):
        start = now()
        train_step(parts, batch, device, 0, i, Path("."))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(now() - start)
    return min(times[1:])


@dataclass
class StepParts:
    """The few parts one training step needs (a timing probe has no loader, schedule or clock)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: LossFn
    ds_weights: list[float]
    dtype: torch.dtype | None
    scaler: Any = None
    selfreg: Any = None


def measure_forward(network: nn.Module, config: Configuration, in_channels: int, device: torch.device,
                    dtype: torch.dtype | None, now: Callable[[], float] = time.monotonic) -> float:
    """Seconds of one inference forward pass of one patch (the faster of two after a warm-up)."""
    was_training = network.training
    network.eval()
    data = torch.randn((1, in_channels, *config.patch_size), device=device)
    times = []
    with torch.no_grad(), autocast(device, dtype):
        for _ in range(3):
            start = now()
            network(data)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(now() - start)
    network.train(was_training)
    return min(times[1:])


# -------------------------------------------------------------------------------------------- assembly
def build_parts(job: FoldJob, state_loader: Callable[[nn.Module, torch.optim.Optimizer], TrainingState],
                resumed: tuple[Configuration, BudgetChoice, list[str]] | None, previous_stage: Path | None,
                *, validate: bool, compile_network: bool, validation_iterations: int | None,
                now: Callable[[], float], started: float) -> tuple[TrainerParts, TrainingState]:
    """Assemble the parts of ``job``'s run and its starting state.

    ``state_loader(network, optimizer)`` returns the state to start from (a fresh one, or what --continue
    loads into the network and optimiser). The order matters for reproducibility: the budget's timing probes
    and the network's initialisation draw from the seeded torch RNG in this order on every run."""
    run, plans = job.run, job.plans
    loss_name = run.loss or DEFAULT_LOSS
    schedule = build_schedule(run.lr_schedule or DEFAULT_SCHEDULE)
    config, budget_choice, budget_reasons = budget_configuration(job, resumed, loss_name)
    for reason in budget_reasons:
        job.say(f"time budget {format_duration(run.time_budget_s or 0)}: {reason}")  # console and log.txt
    iterations = run.iterations_per_epoch or budget_choice.iterations_per_epoch or DEFAULT_ITERATIONS
    val_iterations = validation_iterations or max(1, round(iterations * VALIDATION_FRACTION))
    # with a time budget the budget ends training; --epochs then is an upper bound only
    total_epochs = run.epochs if run.epochs is not None else (None if run.time_budget_s else DEFAULT_EPOCHS)

    network = build_network(plans, config)
    selfreg = selfreg_loss_for(config.architecture.name) if run.selfreg else None
    if run.pretrained and not job.resuming:
        load_pretrained(network, run.pretrained)
    network.to(job.device)
    optimizer = make_optimizer(network, schedule.lr(0.0))
    state = state_loader(network, optimizer)
    if run.time_budget_s:
        state.budget_choice, state.budget_reasons = budget_choice.to_json(), list(budget_reasons)
    dtype = amp_dtype(job.device)
    if job.device.type == "cpu" and budget_choice.autocast == "bfloat16":
        dtype = torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    model: nn.Module = network
    if job.context.enabled:
        # the lowest deep-supervision head has loss weight 0 (reference), so its parameters get no gradient:
        # DDP must be told, or it waits for them forever
        model = nn.parallel.DistributedDataParallel(
            network, device_ids=[job.device.index] if job.device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    if compile_network:
        model = torch.compile(model)

    # data: enlarged patches -> augmentation -> centre crop; deep-supervision targets at the network's scales
    ds_scales, ds_weights = deep_supervision_of(network)
    cascade_classes = plans.num_classes if previous_stage is not None else 0
    settings = augmentation_settings(config.patch_size)
    batch_size = distributed.split_batch(config.batch_size, job.context)
    train_sampler = PatchSampler(job.store, distributed.shard(job.train_ids, job.context),
                                 sample_size_for(config.patch_size, settings), batch_size, config.dims,
                                 previous_stage=previous_stage)
    train_loader = BatchLoader(train_sampler,
                               training_transforms(config.patch_size, settings, ds_scales,
                                                   cascade_classes=cascade_classes),
                               num_workers=run.num_workers, seed=(run.seed, job.context.rank),
                               pin_memory=job.device.type == "cuda", start_iteration=state.iterations_done)
    val_sampler = PatchSampler(job.store, distributed.shard(job.val_ids, job.context), config.patch_size, batch_size,
                               config.dims, previous_stage=previous_stage)

    reserve = FinalValidationReserve(_validation_shapes(job, validate), config.patch_size, validate,
                                     run.time_budget_s)
    clock = BudgetClock(run.time_budget_s, state.elapsed_s, reserve, val_iterations, batch_size, now=now,
                        started=started)
    parts = TrainerParts(
        network=network, model=model, optimizer=optimizer, schedule=schedule,
        loss=build_loss(loss_name, loss_context(plans, config)), ds_weights=ds_weights, selfreg=selfreg,
        dtype=dtype, scaler=scaler, train_loader=train_loader, val_sampler=val_sampler,
        val_transforms=validation_transforms(ds_scales, cascade_classes), clock=clock, configuration=config,
        iterations=iterations, total_epochs=total_epochs,
    )
    if run.time_budget_s and state.seconds_per_patch is None:
        # size the final-validation reserve from the start, not from a 10 % guess
        state.seconds_per_patch = measure_forward(network, config, plans.network_in_channels(config), job.device,
                                                  dtype, now)
    return parts, state


def _validation_shapes(job: FoldJob, validate: bool) -> list[tuple[int, ...]]:
    """Shapes after resampling of the validation cases (what the final-validation reserve is sized from)."""
    if not (validate and job.run.time_budget_s):
        return [() for _ in job.val_ids]
    from autoseg.preprocessing.store import load_properties

    return [tuple(int(s) for s in load_properties(job.store, case_id).shape_after_resampling)
            for case_id in job.val_ids]


def class_names(plans: Plans) -> list[str]:
    """Foreground class names in output order (progress lines, plots)."""
    return [name for name, value in sorted(plans.labels.items(), key=lambda kv: kv[1]) if value > 0]
