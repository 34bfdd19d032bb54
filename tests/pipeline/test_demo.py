"""`autoseg demo --quick` end to end: the whole chain on a fresh root, ending with a Dice that the synthetic
data makes easy to reach. The demo trains a fixed number of iterations, so the Dice does not depend on how
busy the machine is (it used to train to a wall-clock budget and failed on loaded machines)."""
from __future__ import annotations

import json

import pytest

from autoseg.cli import main


@pytest.mark.slow
def test_demo_quick_runs_every_stage_and_reaches_a_good_dice(tmp_path, capsys):
    assert main(["demo", "--quick", "--root", str(tmp_path), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for stage in ("verify", "plan + preprocess", "train", "find-best", "predict", "evaluate"):
        assert stage in printed
    summary = json.loads((tmp_path / "demo_predictions" / "summary.json").read_text())
    assert summary  # written by the evaluator
    line = [row for row in printed.splitlines() if row.startswith("Demo finished")][0]
    mean_dice = float(line.rsplit("mean ", 1)[1].rstrip(")"))
    assert mean_dice > 0.7, line
    fold = tmp_path / "results" / "Dataset999_Demo" / "3d_fullres__unet" / "fold_0"
    for name in ("checkpoint_final.pt", "log.txt", "progress.png", "validation/summary.json"):
        assert (fold / name).is_file(), name
    from autoseg.demo import DEMO_EPOCHS

    assert f"epoch {DEMO_EPOCHS}/{DEMO_EPOCHS} " in (fold / "log.txt").read_text()  # iterations, not seconds
    assert (tmp_path / "results" / "Dataset999_Demo" / "find_best.json").is_file()
