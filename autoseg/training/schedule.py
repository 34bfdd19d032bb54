"""Learning-rate schedules and wall-clock budgets.

Poly schedule of the nnU-Net method (Isensee et al., Nature Methods 2021): ``lr = lr0 * (1 - progress)^0.9``, where
progress is ``epoch / epochs`` normally and the fraction of the training time budget already used under
``--time-budget`` (the schedule runs over wall-clock time, so the LR reaches ~0 as the budget ends however
fast or slow the machine is). With both an epoch count and a budget, progress is the larger of the two
fractions: the LR decays towards whichever limit comes first.
"""
from __future__ import annotations

import re

from autoseg.errors import ConfigurationError

POLY_EXPONENT = 0.9  # nnU-Net PolyLR exponent

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
