"""Light tests of benchmarks/common.py (pure helpers only: no nnU-Net runs, no training)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other as top-level modules (python benchmarks/x.py)

import common  # noqa: E402
from autoseg.errors import ConfigurationError  # noqa: E402


@pytest.mark.parametrize("text, seconds", [("20m", 1200.0), ("1h30m", 5400.0), ("90s", 90.0), (45, 45.0)])
def test_parse_budget(text, seconds):
    assert common.parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5m", "0", "60"])
def test_parse_budget_rejects(text):
    with pytest.raises(ConfigurationError):
        common.parse_budget(text)


@pytest.mark.parametrize("seconds, text", [(None, "-"), (4.26, "4.3 s"), (99.9, "99.9 s"), (725, "12m05s"),
                                           (3725, "1h02m")])
def test_format_seconds(seconds, text):
    assert common.format_seconds(seconds) == text


def test_format_number_handles_missing_and_nan():
    assert common.format_number(0.91249) == "0.912"
    assert common.format_number(3.14159, 2) == "3.14"
    assert common.format_number(None) == "-"
    assert common.format_number(float("nan")) == "-"
    assert common.format_number(float("inf")) == "inf"


def test_markdown_table_alignment_and_escaping():
    table = common.markdown_table(["class", "Dice"], [["a|b", "0.5"]])
    assert table.splitlines() == ["| class | Dice |", "|:---|---:|", "| a\\|b | 0.5 |"]
    with pytest.raises(ValueError):
        common.markdown_table(["a", "b"], [["only one"]])


def test_run_measured_sees_memory_of_child_processes(tmp_path):
    # the parent holds ~10 MiB, its child ~150 MiB: the tree peak must include the child
    child = "import time; x = bytearray(150 * 2**20); time.sleep(1.5)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    result = common.run_measured([sys.executable, "-c", parent], log_path=tmp_path / "log.txt", poll_interval_s=0.1)
    assert result.returncode == 0
    assert result.peak_processes >= 2
    assert result.peak_rss_mb > 150 and result.peak_pss_mb > 140
    assert 1.5 <= result.wall_s < 30


def test_run_measured_failure_shows_log_tail(tmp_path):
    with pytest.raises(common.BenchmarkError, match="exit code 3.*boom"):
        common.run_measured([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                            log_path=tmp_path / "log.txt")


