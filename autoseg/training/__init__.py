"""Training: sampler + loader, augmentation, losses, schedule, checkpoint, trainer, distributed, progress.

The one door in is :func:`train` (``autoseg train``). The checkpoint files it writes are the contract in
:mod:`autoseg.contracts.checkpoint`, which inference reads without importing training. ``train`` is imported
lazily so that importing a training module does not pull in the whole training stack.
"""
from __future__ import annotations

from typing import Any

__all__ = ["train", "parse_duration"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from autoseg.training.trainer import train

        return train
    if name == "parse_duration":
        from autoseg.training.schedule import parse_duration

        return parse_duration
    raise AttributeError(f"module 'autoseg.training' has no attribute {name!r}")
