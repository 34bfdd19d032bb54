"""A CI-sized benchmarks/faults.py (issue 18 item 4): `autoseg plan`, `autoseg train` and `autoseg predict` are
each killed with SIGKILL once, at a seeded random moment, and rerun (train with --continue); the final state
must equal an uninterrupted run's, with no temp file and no surviving worker process. The moment is random,
the assertions are on the final state only, so the test does not depend on the machine's speed (on a busy
machine a kill may come after the command finished: that trial then checks a plain rerun)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

FAULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "faults.py"


def _faults_module():
    spec = importlib.util.spec_from_file_location("autoseg_benchmark_faults", FAULTS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_killed_plan_train_and_predict_end_as_an_uninterrupted_run(tmp_path) -> None:
    faults = _faults_module()
    trials, _ = faults.run_benchmark(tmp_path / "faults", trials=3, seed=5, epochs=1, iters=2, num_cases=4,
                                     shape=(8, 20, 20))
    assert [t.stage for t in trials] == ["plan", "train", "predict"]
    for trial in trials:
        assert trial.identical, f"{trial.stage}: {trial.detail}"
        assert trial.temp_files == [], trial.stage
        assert trial.orphans == 0, trial.stage  # (slow_to_die: DataLoader workers, see faults.py)
