"""User-facing errors.

Every mistake a user can make (a bad dataset, a missing plan, an unreadable image) raises a subclass of
:class:`AutosegError`. The CLI catches these once and prints the message as a single line; anything else
is a bug and keeps its traceback. Messages say which file, what was expected, what was found and the fix.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class AutosegError(Exception):
    """Base class of all errors meant for the user rather than the developer."""


class DatasetError(AutosegError):
    """The raw dataset (folder layout, dataset.json, a case) is not what autoseg expects."""


class ImageReadError(AutosegError):
    """An image or label file cannot be read or has an unsupported format."""


class ConfigurationError(AutosegError):
    """A plan, configuration, architecture or option is invalid or missing."""


class PreprocessingError(AutosegError):
    """Preprocessed data is missing, incomplete or inconsistent with the plan."""


class CheckpointError(AutosegError):
    """A checkpoint is missing, corrupted or belongs to another model."""


class TrainingError(AutosegError):
    """Training cannot continue (NaN loss, out of memory, ...)."""


class WriteError(AutosegError):
    """An output could not be written completely (disk full, read-only folder, ...); nothing was replaced."""


class PredictionError(AutosegError):
    """One or more cases could not be predicted."""


class BusyError(AutosegError):
    """Another process is working on the same fold or dataset stage (autoseg.locks)."""


class TrainingInterrupted(TrainingError):
    """Training stopped on SIGINT/SIGTERM (Ctrl-C, a cluster's pre-emption); the message says how to resume.
    ``exit_code`` is the shell's convention for death by that signal (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def reraised_as(target: type[AutosegError], *sources: type[BaseException]) -> Iterator[None]:
    """Inside the block, an exception of one of ``sources`` becomes ``target`` with the same text.

    For packages with their own error type: ``autoseg.networks`` imports nothing of autoseg outside itself, so
    the stages that build networks from a plan (planner, trainer, predictor, nnU-Net import) turn its
    ``NetworkError`` into the :class:`ConfigurationError` users see at that boundary, with
    ``reraised_as(ConfigurationError, NetworkError)``; their Python callers keep getting ConfigurationError and
    the CLI keeps importing no stage (nor torch) before a command runs.
    """
    try:
        yield
    except sources as exc:
        raise target(str(exc)) from exc
