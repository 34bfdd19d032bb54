"""Evaluation: metrics, `autoseg evaluate`, postprocessing decisions, `autoseg find-best` and its report.

``find_best`` is imported eagerly although it is a submodule's name too: a lazy attribute would be shadowed
by the submodule object as soon as anything imports ``autoseg.evaluation.find_best``. It is light anyway;
matplotlib is only imported when a report is drawn.
"""
from __future__ import annotations

from autoseg.evaluation.evaluate import EvaluationSummary, evaluate_folders, format_table
from autoseg.evaluation.find_best import FindBestResult, find_best

__all__ = ["EvaluationSummary", "FindBestResult", "evaluate_folders", "find_best", "format_table"]
