"""What a training run carries from iteration to iteration and from run to run (``--continue``).

:class:`TrainingState` is everything a resume needs besides the weights, the optimiser and the random
states; it travels in the checkpoint metadata (autoseg.training.checkpoint) and nowhere else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from autoseg.contracts.checkpoint import (
    FINAL,
    LATEST,
    CheckpointMetadata,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from autoseg.errors import CheckpointError
from autoseg.training.checkpoint import capture_rng_state, restore_rng_state
from autoseg.training.progress import Curves
from autoseg.training.schedule import format_duration

if TYPE_CHECKING:  # annotations only: parts and job import this module
    from autoseg.contracts.plans import Configuration
    from autoseg.training.budget import BudgetChoice
    from autoseg.training.job import FoldJob
    from autoseg.training.parts import TrainerParts


@dataclass
class TrainingState:
    """Everything --continue needs besides the weights and the optimiser."""

    epoch: int = 0  # completed epochs
    curves: Curves = field(default_factory=Curves)
    ema: float | None = None
    best_ema: float = -1.0
    elapsed_s: float = 0.0  # wall-clock training time of earlier runs (the --time-budget clock adds this run's)
    seconds_per_patch: float | None = None  # measured inference time per patch (validation estimate)
    iterations_done: int = 0  # training iterations over all epochs and runs
    budget_choice: dict[str, Any] | None = None  # BudgetChoice.to_json() of a --time-budget run
    budget_reasons: list[str] = field(default_factory=list)
    # a checkpoint saved mid-epoch (a signal, the 5-minute save): iterations of epoch ``epoch`` already done and
    # their losses, so a resume finishes that epoch exactly as an uninterrupted run would have
    epoch_iteration: int = 0
    epoch_losses: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------------- checkpoint I/O
def checkpoint_metadata(job: "FoldJob", parts: "TrainerParts", state: TrainingState) -> CheckpointMetadata:
    """What a checkpoint records besides tensors: the run, its (possibly budget-adapted) configuration, the
    state a --continue resumes from."""
    run, plans, config = job.run, job.plans, parts.configuration
    return CheckpointMetadata(
        dataset_name=job.location.name, configuration=asdict(config), plans=plans.to_json(), fold=job.fold,
        epoch=state.epoch, architecture=config.architecture.name, in_channels=plans.network_in_channels(config),
        num_classes=plans.num_classes, selfreg=bool(run.selfreg), curves=state.curves.to_json(),
        ema_pseudo_dice=state.ema, best_ema_pseudo_dice=state.best_ema, elapsed_s=float(parts.clock.elapsed()),
        seconds_per_patch=state.seconds_per_patch, seed=run.seed, epochs=parts.total_epochs,
        iterations_per_epoch=parts.iterations, time_budget_s=run.time_budget_s,
        iterations_done=state.iterations_done, budget_choice=state.budget_choice,
        budget_reasons=list(state.budget_reasons), epoch_iteration=state.epoch_iteration,
        epoch_losses=list(state.epoch_losses),
    )


def save_state(path: Path, job: "FoldJob", parts: "TrainerParts", state: TrainingState) -> None:
    """Write a checkpoint of the network, optimiser, schedule, random states and ``state`` to ``path``."""
    metadata = checkpoint_metadata(job, parts, state)
    scheduler = {**parts.schedule.to_json(), "epochs": parts.total_epochs, "time_budget_s": job.run.time_budget_s,
                 "elapsed_s": metadata.elapsed_s}
    save_checkpoint(make_checkpoint(parts.network.state_dict(), metadata, parts.optimizer.state_dict(), scheduler,
                                    capture_rng_state()), path)


def resume_state(output: Path, network: nn.Module, optimizer: torch.optim.Optimizer,
                 say: Callable[[str], None]) -> TrainingState:
    """Load checkpoint_latest.pt (else final) into network/optimiser and return its state. The caller has
    checked a checkpoint exists; a corrupted one, or one of another plan, is a CheckpointError."""
    for name in (LATEST, FINAL):
        path = output / name
        if path.is_file():
            break
    else:  # the trainer decided there is a checkpoint; it vanished since
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


def resumed_configuration(output: Path) -> "tuple[Configuration, BudgetChoice, list[str]] | None":
    """The adapted configuration and budget choice of the checkpoint --continue will load (None: no checkpoint
    or not a budget run), so a resumed budget run rebuilds the same network."""
    from autoseg.training.budget import BudgetChoice

    for name in (LATEST, FINAL):
        if (output / name).is_file():
            metadata = CheckpointMetadata.from_json(load_checkpoint(output / name)["metadata"], output / name)
            if not metadata.budget_choice:
                return None
            choice = BudgetChoice(**metadata.budget_choice)
            reasons = [f"resumed: {r}" for r in metadata.budget_reasons or []]
            return metadata.parsed_configuration(), choice, reasons
    return None
