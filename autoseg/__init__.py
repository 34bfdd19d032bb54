"""autoseg: self-configuring medical image segmentation.

Public API (each stage is a function with the same arguments as its command)::

    autoseg.plan_dataset, autoseg.preprocess_dataset, autoseg.train, autoseg.predict,
    autoseg.evaluate_folders, autoseg.find_best, autoseg.Predictor

Attributes are imported lazily so that `import autoseg` and `autoseg --help` stay fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "plan_dataset": "autoseg.pipeline",
    "preprocess_dataset": "autoseg.preprocessing",
    "train": "autoseg.training",
    "predict": "autoseg.inference",
    "Predictor": "autoseg.inference",
    "evaluate_folders": "autoseg.evaluation",
    "find_best": "autoseg.evaluation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autoseg' has no attribute {name!r}")
