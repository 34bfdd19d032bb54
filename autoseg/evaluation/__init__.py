"""Evaluation: metrics, `autoseg evaluate`, postprocessing decisions, `autoseg find-best` and its report.

``evaluate_folders`` is imported eagerly (light: numpy, scipy); ``find_best`` lazily, because it pulls in
matplotlib for the report.
"""
from __future__ import annotations

from typing import Any

from autoseg.evaluation.evaluate import EvaluationSummary, evaluate_folders, format_table

__all__ = ["EvaluationSummary", "evaluate_folders", "find_best", "format_table"]


def __getattr__(name: str) -> Any:
    if name == "find_best":
        from autoseg.evaluation.find_best import find_best

        return find_best
    raise AttributeError(f"module 'autoseg.evaluation' has no attribute {name!r}")
