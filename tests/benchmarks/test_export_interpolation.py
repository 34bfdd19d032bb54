"""benchmarks/export_interpolation.py end to end on a tiny trained fold (plumbing; the numerics of both
interpolations are tested in tests/preprocessing/test_resampling.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS.parent / "benchmarks"))  # scripts import each other as top-level modules
sys.path.insert(0, str(TESTS / "training"))  # the training tests' tiny stored dataset

import export_interpolation  # noqa: E402
from tiny_data import DATASET, build_tiny_dataset  # noqa: E402

from autoseg.training import train  # noqa: E402


def test_table_has_both_interpolations_per_class(tmp_path, capsys):
    build_tiny_dataset(tmp_path, dims=3)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine: one thread is the fastest for a tiny network
    try:
        train(DATASET, "3d_fullres", 0, root=tmp_path, epochs=1, iterations_per_epoch=2, num_workers=0,
              validate=False, device="cpu", validation_iterations=1)
    finally:
        torch.set_num_threads(previous)
    assert export_interpolation.main([DATASET, "3d_fullres", "--folds", "0", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 0 ")]
    assert [r[3].strip() for r in rows] == ["1 object", "2 satellite"]
    for row in rows:
        assert row[1].strip() == "validation" and int(row[2]) == 2  # fold 0 of 6 cases validates 2
        log_space, linear, delta = float(row[4]), float(row[5]), float(row[6])
        assert 0.0 <= log_space <= 1.0 and 0.0 <= linear <= 1.0
        assert delta == pytest.approx(log_space - linear, abs=2e-4)


def test_dice_of_empty_masks_is_one():
    import numpy as np

    empty = np.zeros((2, 3), bool)
    assert export_interpolation.dice(empty, empty) == 1.0
    full = np.ones((2, 3), bool)
    assert export_interpolation.dice(full, empty) == 0.0
