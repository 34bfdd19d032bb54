"""What one training run of a fold is, on disk: its options (``run.json``) and the files it leaves.

``run.json`` is written atomically when training starts, before the first iteration, so `--continue` can
resume exactly the run that was started (its epochs, iterations, budget, seed, ...) even when it was killed
before its first checkpoint. A fold folder holds one run at a time: starting over on a folder that holds a
finished or interrupted run is refused unless `--force` removes that run's files first (only autoseg's own
files: anything else a user put there stays), so two runs' checkpoints and logs never mix.
"""
from __future__ import annotations

import datetime
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from autoseg.contracts.checkpoint import BEST, FINAL, LATEST, CheckpointMetadata, load_checkpoint
from autoseg.errors import ConfigurationError, TrainingError
from autoseg.fileio import read_json, write_json

RUN_FILE = "run.json"
RUN_SCHEMA_VERSION = 1
DEFAULT_SEED = 12345
# autoseg's own files of a run in a fold folder: what --force removes (the lock file stays: see autoseg.locks)
RUN_FILES = (LATEST, BEST, FINAL, "log.txt", "training_log.json", "progress.png", RUN_FILE, "timing.json",
             "plans.json", "environment.json")
RUN_FOLDERS = ("validation",)


@dataclass
class RunOptions:
    """The options a run of one fold was started with (``run.json``). ``None``: not given (the default, or
    for ``iterations_per_epoch`` under a time budget: chosen by the budget and stored in the checkpoint)."""

    dataset: str
    configuration: str
    architecture: str
    fold: str
    epochs: int | None
    iterations_per_epoch: int | None
    time_budget_s: float | None
    seed: int
    selfreg: bool
    pretrained: str | None
    num_workers: int
    device: str  # device kind trained on: cpu, cuda, mps (informative: a resume may move to another device)
    started: str  # ISO 8601 time the run was first started
    resumed: list[str] = field(default_factory=list)  # times of each --continue
    loss: str | None = None  # a name in training/losses.py's registry; None: the default (run.json before it)
    lr_schedule: str | None = None  # a name in training/schedule.py's registry; None: the default
    schema_version: int = RUN_SCHEMA_VERSION


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write_run_options(folder: Path, options: RunOptions) -> None:
    write_json(folder / RUN_FILE, asdict(options))


def read_run_options(folder: Path) -> RunOptions | None:
    """``run.json`` of ``folder`` (None when there is none)."""
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = read_json(path)
        known = {f.name for f in fields(RunOptions)}
        return RunOptions(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"{path}: expected the JSON options of the run autoseg started here ({str(exc).splitlines()[0][:120]}); "
            "delete the file to continue with the options you give, or use --force to start over"
        ) from exc


def options_from_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The options stored in the checkpoint --continue will load, for fold folders trained before run.json
    existed (None: no checkpoint). A broken checkpoint raises CheckpointError: never a silent fresh start."""
    for name in (LATEST, FINAL):
        if (folder / name).is_file():
            metadata = CheckpointMetadata.from_json(load_checkpoint(folder / name)["metadata"], folder / name)
            budget = metadata.time_budget_s
            # under a budget the stored epoch length is the budget's choice (kept in the checkpoint), not an option
            iterations = None if budget else metadata.iterations_per_epoch
            return {"epochs": metadata.epochs, "iterations_per_epoch": iterations, "time_budget_s": budget,
                    "seed": metadata.seed, "selfreg": metadata.selfreg}
    return None


# what a --continue may change: the schedule may be extended, the loader's worker count is free (batches do
# not depend on it, see loader.py); anything else would make the resumed run another run
EXTENDABLE = ("epochs", "time_budget_s")
FREE = ("num_workers",)
FIXED = ("iterations_per_epoch", "seed", "selfreg", "pretrained", "loss", "lr_schedule")
FLAGS = {"epochs": "--epochs", "time_budget_s": "--time-budget", "num_workers": "-np", "iterations_per_epoch":
         "--iters-per-epoch", "seed": "--seed", "selfreg": "--selfreg", "pretrained": "--pretrained",
         "loss": "--loss", "lr_schedule": "--lr-schedule"}


def _show(key: str, value: Any) -> str:
    """An option as it is written on the command line: ``--seed 7``, ``--time-budget 2h00m00s``, ``--selfreg``."""
    if value is None or value is False:
        return f"no {FLAGS[key]}"
    if value is True:
        return FLAGS[key]
    if key == "time_budget_s":
        from autoseg.training.schedule import format_duration

        return f"{FLAGS[key]} {format_duration(value)}"
    return f"{FLAGS[key]} {value}"


def merge_for_continue(saved: dict[str, Any], given: dict[str, Any], source: Path) -> tuple[dict[str, Any], list[str]]:
    """The options of a resumed run: ``saved`` (run.json or checkpoint) completed by ``given`` (the command
    line; None = not given). A given ``--epochs``/``--time-budget`` wins (extending a run), ``-np`` is free;
    a given seed, iterations per epoch, --selfreg or --pretrained that differs from the run's is an error.
    Returns (options, notes on what was taken from the run or changed)."""
    merged, kept, changed = dict(given), [], []
    for key in FIXED:
        if given.get(key) is not None and given[key] != saved.get(key):
            raise ConfigurationError(
                f"{source}: {_show(key, given[key])} differs from the run being continued ({_show(key, saved.get(key))}); "
                f"drop {FLAGS[key]} to continue that run, or use --force to start a new one"
            )
    for key in (*FIXED, *EXTENDABLE, *FREE):
        if given.get(key) is None and saved.get(key) is not None:
            merged[key] = saved[key]
            if key not in FREE and saved[key] is not False:
                kept.append(_show(key, saved[key]))
        elif key in EXTENDABLE and given.get(key) is not None and saved.get(key) != given[key]:
            changed.append(f"{_show(key, given[key])} (the run had {_show(key, saved.get(key))})")
    notes = []
    if kept:
        notes.append(f"--continue: keeping the run's options ({', '.join(kept)})")
    if changed:
        notes.append(f"--continue: extending the run with {', '.join(changed)}")
    return merged, notes


# ------------------------------------------------------------------------------------- the fold's state
def _when(path: Path) -> str:
    return datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")


def run_files(folder: Path) -> list[str]:
    """autoseg's files of an earlier run present in ``folder``."""
    return [n for n in (*RUN_FILES, *RUN_FOLDERS) if (folder / n).exists()]


def refuse_mixing_runs(folder: Path, command: str) -> None:
    """Without --continue or --force, a folder holding an earlier run's checkpoints is an error: a new run
    would replace them one by one, append to its log and leave its validation/ beside other weights. (An
    earlier start that saved no checkpoint at all is only cleared away by the caller: nothing of value.)"""
    force = "or --force to start over (deletes that run's checkpoints, logs and validation/)"
    if (folder / FINAL).is_file():
        raise TrainingError(
            f"{folder / FINAL}: {folder.name} is already trained ({FINAL}, {_when(folder / FINAL)}); use "
            f"--continue to extend or resume it (`{command} --continue`), {force}"
        )
    if (folder / LATEST).is_file():
        raise TrainingError(
            f"{folder / LATEST}: {folder.name} has an interrupted run ({LATEST}, {_when(folder / LATEST)}); "
            f"add --continue to resume it (`{command} --continue`), {force}"
        )
    if (folder / BEST).is_file():  # e.g. killed before its first checkpoint_latest.pt: its best weights stay
        raise TrainingError(
            f"{folder / BEST}: {folder.name} holds an earlier run that saved only {BEST} "
            f"({_when(folder / BEST)}); add --continue to restart that run with its options, {force}"
        )


def remove_run(folder: Path) -> list[str]:
    """Delete autoseg's files of the run in ``folder`` (nothing else); returns what was removed."""
    removed = run_files(folder)
    for name in removed:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed
