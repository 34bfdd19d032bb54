"""One fold's run, resolved: what every part of the trainer reads, passed as one object."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from autoseg.paths import DatasetLocation
from autoseg.contracts.plans import Configuration, Plans
from autoseg.training import distributed
from autoseg.training.progress import append_log
from autoseg.training.run import RunOptions

log = logging.getLogger("autoseg.training.trainer")


@dataclass
class FoldJob:
    """A resolved ``autoseg train D C F``: dataset, plan, fold, where it writes, with which options, on which
    device and rank. ``resuming``: a checkpoint of this run exists and --continue loads it."""

    location: DatasetLocation
    plans: Plans
    config: Configuration  # the plan's configuration (a --time-budget may adapt a copy: TrainerParts)
    fold: int | str
    train_ids: list[str]
    val_ids: list[str]
    store: Path  # the configuration's preprocessed cases
    output: Path  # the fold folder
    run: RunOptions
    command: str  # the command that resumes this run with --continue
    device: torch.device
    context: distributed.DistributedContext
    resuming: bool

    @property
    def log_file(self) -> Path:
        return self.output / "log.txt"

    def say(self, message: str) -> None:
        """A line for the console and log.txt (rank 0 only)."""
        if self.context.is_main:
            log.info(message)
            append_log(self.log_file, message)
