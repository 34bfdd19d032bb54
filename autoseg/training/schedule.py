"""Learning-rate schedules and wall-clock budgets.

Poly schedule of the nnU-Net method (Isensee et al., Nature Methods 2021): ``lr = lr0 * (1 - progress)^0.9``, where
progress is ``epoch / epochs`` normally and the fraction of the training time budget already used under
``--time-budget`` (the schedule runs over wall-clock time, so the LR reaches ~0 as the budget ends however
fast or slow the machine is). With both an epoch count and a budget, progress is the larger of the two
fractions: the LR decays towards whichever limit comes first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from autoseg.errors import ConfigurationError

INITIAL_LR = 0.01  # nnU-Net's SGD learning rate
POLY_EXPONENT = 0.9  # nnU-Net PolyLR exponent
DEFAULT_SCHEDULE = "poly"

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)", re.IGNORECASE)
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def poly_lr(initial_lr: float, progress: float, exponent: float = POLY_EXPONENT) -> float:
    """``initial_lr * (1 - progress)^exponent`` with progress clipped to [0, 1] (unitless fraction)."""
    progress = min(max(float(progress), 0.0), 1.0)
    return initial_lr * (1.0 - progress) ** exponent


def training_progress(
    epoch: int,
    epochs: int | None,
    elapsed_s: float | None = None,
    budget_s: float | None = None,
) -> float:
    """Fraction of training done in [0, 1]: ``epoch/epochs``, ``elapsed_s/budget_s`` or the larger of both."""
    fractions = []
    if epochs:
        fractions.append(epoch / epochs)
    if budget_s:
        fractions.append((elapsed_s or 0.0) / budget_s)
    return min(max(fractions, default=0.0), 1.0)


# ------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule: ``lr(progress)`` for progress in [0, 1] (:func:`training_progress`), and the
    JSON-able options a checkpoint records (``to_json``)."""

    name: str
    lr: Callable[[float], float]
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.name, **self.options}


ScheduleFactory = Callable[[], Schedule]


@dataclass(frozen=True)
class _ScheduleEntry:
    factory: ScheduleFactory
    description: str


_SCHEDULES: dict[str, _ScheduleEntry] = {}


def register_schedule(name: str, description: str) -> Callable[[ScheduleFactory], ScheduleFactory]:
    """Decorator registering a schedule factory under ``name`` (``autoseg train --lr-schedule NAME``)."""

    def decorator(factory: ScheduleFactory) -> ScheduleFactory:
        if name in _SCHEDULES and _SCHEDULES[name].factory is not factory:
            raise ValueError(f"schedule {name!r} is registered twice")
        _SCHEDULES[name] = _ScheduleEntry(factory, description)
        return factory

    return decorator


def available_schedules() -> dict[str, str]:
    """Registered schedule names -> one-line descriptions (for --help)."""
    return {name: entry.description for name, entry in sorted(_SCHEDULES.items())}


def build_schedule(name: str) -> Schedule:
    """The schedule registered as ``name``; an unknown name is a ConfigurationError listing the choices."""
    if name not in _SCHEDULES:
        raise ConfigurationError(
            f"--lr-schedule {name!r}: unknown schedule; choose one of {', '.join(sorted(_SCHEDULES))}"
        )
    return _SCHEDULES[name].factory()


@register_schedule("poly", "lr0 * (1 - progress)^0.9 from lr0 = 0.01 (the nnU-Net schedule)")
def poly_schedule() -> Schedule:
    return Schedule("poly", lambda progress: poly_lr(INITIAL_LR, progress, POLY_EXPONENT),
                    {"initial_lr": INITIAL_LR, "exponent": POLY_EXPONENT})


WARMUP_FRACTION = 0.05  # 50 of 1000 epochs: the linear warm-up transformer recipes use before decaying


@register_schedule("poly-warmup", "linear warm-up from 0 over the first 5 % of training, then poly from 0.01 "
                    "(for transformer networks such as unetrpp, unet2022, which can diverge at a full first step)")
def poly_warmup_schedule() -> Schedule:
    def lr(progress: float) -> float:
        progress = min(max(float(progress), 0.0), 1.0)
        if progress < WARMUP_FRACTION:
            return INITIAL_LR * progress / WARMUP_FRACTION
        return poly_lr(INITIAL_LR, (progress - WARMUP_FRACTION) / (1.0 - WARMUP_FRACTION), POLY_EXPONENT)

    return Schedule("poly-warmup", lr,
                    {"initial_lr": INITIAL_LR, "exponent": POLY_EXPONENT, "warmup_fraction": WARMUP_FRACTION})


# ------------------------------------------------------------------------------------------- durations
def parse_duration(text: str | float | int | None) -> float | None:
    """``"20m"`` -> 1200.0, ``"1h30m"`` -> 5400.0, ``"23h"``, ``"90s"``, ``"2d"``; a Python number means seconds.

    Text needs a unit: ``--time-budget 2`` would mean two seconds to the parser and two hours to most
    people, so a bare number on the command line is refused with the spellings to use. Raises
    ConfigurationError for that and anything else (empty, negative, unknown unit).
    """
    if text is None:
        return None
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        value = text.strip().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", value):
            raise ConfigurationError(
                f"--time-budget {text!r}: give a unit, e.g. {value}h, {value}m or {value}s (a bare number is ambiguous)"
            )
        if value and re.fullmatch(r"(?:\d+(?:\.\d+)?(?:d|h|m|s))+", value, re.IGNORECASE):
            seconds = sum(float(n) * _UNIT_SECONDS[u.lower()] for n, u in _DURATION.findall(value))
        else:
            raise ConfigurationError(
                f"--time-budget {text!r}: expected a duration like 20m, 1h30m, 23h or 90s"
            )
    if seconds <= 0:
        raise ConfigurationError(f"--time-budget {text!r}: the budget must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    """``5400`` -> ``"1h30m00s"``; for logs and ETA."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
