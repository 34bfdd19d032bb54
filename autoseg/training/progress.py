"""Per-epoch logging: one line to stdout and log.txt, a progress bar per epoch on a terminal, the curves in training_log.json, progress.png."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from autoseg.fileio import atomic_path, write_json

log = logging.getLogger(__name__)

CURVE_KEYS = ("epochs", "train_loss", "val_loss", "pseudo_dice", "lr", "epoch_time")


@dataclass
class Curves:
    """What is logged per epoch; JSON-able, stored in checkpoints so ``--continue`` keeps the history."""

    epochs: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    pseudo_dice: list[list[float]] = field(default_factory=list)  # per epoch, one value per foreground class
    lr: list[float] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)
    ema_pseudo_dice: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: list(getattr(self, k)) for k in (*CURVE_KEYS, "ema_pseudo_dice")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Curves":
        return cls(**{k: list(data.get(k, [])) for k in (*CURVE_KEYS, "ema_pseudo_dice")})

    def append(self, epoch: int, train_loss: float, val_loss: float, pseudo_dice: list[float], lr: float,
               epoch_time: float, ema: float) -> None:
        self.epochs.append(int(epoch))
        self.train_loss.append(float(train_loss))
        self.val_loss.append(float(val_loss))
        self.pseudo_dice.append([float(d) for d in pseudo_dice])
        self.lr.append(float(lr))
        self.epoch_time.append(float(epoch_time))
        self.ema_pseudo_dice.append(float(ema))


def append_log(path: str | os.PathLike, line: str) -> None:
    """Append one line to log.txt (appending is the one non-atomic write: a log must grow, and a torn last
    line loses nothing else)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")


def epoch_line(epoch: int, epochs: int | None, curves: Curves, class_names: list[str], eta: str) -> str:
    """``epoch 3/10  train 0.812  val 0.790  dice [object 0.61, satellite 0.40]  ema 0.35  lr 0.00731  12.3s  ETA 1m26s``"""
    dice = ", ".join(f"{n} {d:.3f}" for n, d in zip(class_names, curves.pseudo_dice[-1]))
    total = f"/{epochs}" if epochs else ""
    return (f"epoch {epoch}{total}  train {curves.train_loss[-1]:.4f}  val {curves.val_loss[-1]:.4f}  "
            f"pseudo-dice [{dice}]  ema {curves.ema_pseudo_dice[-1]:.4f}  lr {curves.lr[-1]:.5f}  "
            f"{curves.epoch_time[-1]:.1f}s  ETA {eta}")


def plot_progress(curves: Curves, path: str | os.PathLike, class_names: list[str] | None = None) -> None:
    """progress.png: losses, pseudo-Dice per class (+ EMA), learning rate and epoch time over epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(4, 1, figsize=(9, 12), sharex=True)
    x = curves.epochs
    axes[0].plot(x, curves.train_loss, label="train loss")
    axes[0].plot(x, curves.val_loss, label="val loss")
    axes[0].set_ylabel("loss")
    axes[0].legend(loc="upper right")
    if curves.pseudo_dice and curves.pseudo_dice[0]:
        for k in range(len(curves.pseudo_dice[0])):
            name = class_names[k] if class_names and k < len(class_names) else f"class {k + 1}"
            axes[1].plot(x, [d[k] for d in curves.pseudo_dice], label=name, alpha=0.7)
    axes[1].plot(x, curves.ema_pseudo_dice, label="EMA mean", color="black")
    axes[1].set_ylabel("pseudo Dice")
    axes[1].legend(loc="lower right")
    axes[2].plot(x, curves.lr)
    axes[2].set_ylabel("learning rate")
    axes[3].plot(x, curves.epoch_time)
    axes[3].set_ylabel("epoch time (s)")
    axes[3].set_xlabel("epoch")
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)


def write_curves(curves: Curves, path: str | os.PathLike) -> None:
    write_json(path, curves.to_json())


def print_epoch_line(line: str, log_file: str | os.PathLike) -> None:
    """The per-epoch summary: on stdout (the results of the command; messages and warnings go to stderr),
    through tqdm so a progress bar on the terminal is not torn, and into log.txt."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
    append_log(log_file, line)


def iteration_bar(epoch: int, epochs: int | None, iterations: int, first_iteration: int, enabled: bool):
    """A tqdm bar over one epoch's iterations, on stderr, only on a terminal (not in logs, CI or tests)."""
    from tqdm import tqdm

    total = f"/{epochs}" if epochs else ""
    return tqdm(total=iterations, initial=first_iteration, desc=f"epoch {epoch + 1}{total}", unit="it",
                file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


LONG_RUN_S = 3600.0  # below an hour a run needs no warning


def duration_warning(seconds_per_iteration: float, remaining_iterations: int) -> str | None:
    """One line estimating how long the rest of a CPU run without --time-budget takes, when that is long
    (> 1 hour), e.g. "at 2.6 s/iteration this run takes ~7.5 days on CPU; use --time-budget 12h or a GPU"
    (the default 1000 x 250 iterations of a 3D U-Net on a CPU). On a GPU long runs are the norm: no warning."""
    seconds = seconds_per_iteration * remaining_iterations
    if seconds <= LONG_RUN_S:
        return None
    if seconds >= 2 * 86400:
        length = f"~{seconds / 86400:.1f} days"
    elif seconds >= 2 * 3600:
        length = f"~{seconds / 3600:.1f} hours"
    else:
        length = f"~{seconds / 60:.0f} minutes"
    return f"at {seconds_per_iteration:.3g} s/iteration this run takes {length} on CPU; use --time-budget 12h or a GPU"
