"""Report helpers: lenient training-log reading and the choice of overlay cases."""
from __future__ import annotations

import json
import math

import pytest

from autoseg.evaluation.report import pick_overlay_cases, read_training_log


def test_training_log_is_read_leniently(tmp_path):
    path = tmp_path / "training_log.json"
    assert read_training_log(path) is None
    path.write_text(json.dumps({"train_loss": [1.0, 0.5, "x"], "pseudo_dice": [[0.2, 0.4], [0.6, None]], "other": 3}))
    curves = read_training_log(path)
    assert curves["train_loss"][:2] == [1.0, 0.5] and math.isnan(curves["train_loss"][2])
    assert curves["pseudo_dice"] == pytest.approx([0.3, 0.6])  # mean over classes, non-numbers ignored
    assert curves["epochs"] == [0, 1, 2] and "val_loss" not in curves
    path.write_text("{not json")
    assert read_training_log(path) is None


def test_overlay_cases_are_worst_median_best():
    scores = [("a", 0.9), ("b", 0.1), ("c", 0.5), ("d", 0.7), ("e", 0.3)]
    assert pick_overlay_cases(scores) == [("worst", "b", 0.1), ("median", "c", 0.5), ("best", "a", 0.9)]
    assert pick_overlay_cases([("a", 0.5)]) == [("worst", "a", 0.5)]
    assert pick_overlay_cases([]) == []
