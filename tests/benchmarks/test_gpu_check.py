"""benchmarks/gpu_check.py: the --dry-run path end to end on CPU, and its guards (time, per-architecture errors)."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other as top-level modules (python benchmarks/x.py)

import gpu_check  # noqa: E402
from autoseg.contracts.plans import load_plans  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("gpu_check")
    assert gpu_check.main(["--dry-run", "--arch", "unet", "--workers", "1", "--work", str(work),
                           "--out", str(work / "table.md")]) == 0
    return work


def test_dry_run_writes_the_table_with_na_memory(dry_run: Path) -> None:
    table = (dry_run / "table.md").read_text()
    assert "| configuration | architecture | patch | batch | estimate GiB | measured GiB |" in table
    result = json.loads((dry_run / "table.json").read_text())
    (row,) = result["rows"]
    plans = load_plans(dry_run / "plans.json")
    configuration = plans.configurations["3d_fullres"]
    assert row["configuration"] == "3d_fullres" and row["status"] == "ok"
    assert row["patch"] == configuration.patch_size and row["batch"] == configuration.batch_size
    assert row["estimate_bytes"] == configuration.memory_estimate_bytes > 0
    assert row["measured_bytes"] is None and row["step_s"] > 0 and row["predict_s"] > 0
    line = next(line for line in table.splitlines() if line.startswith("| 3d_fullres |"))
    assert line.split("|")[6].strip() == "n/a"  # measured GiB
    assert result["context"]["classes"] == 12 and result["context"]["device"] == "cpu (dry run)"
    assert plans.num_classes == 13


def test_a_failing_architecture_is_a_row_not_a_crash(dry_run: Path) -> None:
    plans = load_plans(dry_run / "plans.json")
    configuration = plans.configurations["3d_fullres"]
    broken = replace(configuration, architecture=replace(configuration.architecture, name="no_such_network"))
    plans.configurations["3d_fullres"] = broken
    row = gpu_check.check_configuration("3d_fullres", plans, _cpu(), 1, False, gpu_check.TimeGuard(600.0), 0.0,
                                        lambda c: None, warmup=0)
    assert row.status.startswith("error: ") and "no_such_network" in row.status
    assert row.step_s is None and row.estimate_bytes == configuration.memory_estimate_bytes


def test_time_guard_skips_without_running(dry_run: Path) -> None:
    now = [100.0]
    guard = gpu_check.TimeGuard(30.0, clock=lambda: now[0])
    assert guard.fits(30.0) and not guard.fits(30.5)
    now[0] = 125.0
    plans = load_plans(dry_run / "plans.json")
    row = gpu_check.check_configuration("3d_fullres", plans, _cpu(), 1, False, guard, 10.0,
                                        lambda c: pytest.fail("must not predict"), warmup=0)
    assert row.status == "skipped (time guard: 5 s left)" and row.step_s is None


def test_row_cells_ratio_and_error_text() -> None:
    row = gpu_check.Row("3d_fullres", "unet", [64, 128, 128], 2, estimate_bytes=4 * 2**30, measured_bytes=3 * 2**30,
                        step_s=0.5, predict_s=12.0)
    cells = row.cells()
    assert cells[2] == "64x128x128" and cells[4:7] == ["4.00", "3.00", "0.75"]
    long = gpu_check.error_status(RuntimeError("CUDA out of memory. " + "x" * 300 + "\nsecond line"))
    assert long.startswith("error: RuntimeError: CUDA out of memory.") and len(long) == 160


def _cpu():
    import torch

    return torch.device("cpu")
