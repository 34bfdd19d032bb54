"""benchmarks/bench_large.py: arguments, alternation, disk and table arithmetic, and our side at a tiny size."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other as top-level modules (python benchmarks/x.py)

import bench_large  # noqa: E402
from common import Measurement  # noqa: E402


def test_arguments_default_to_the_large_set_and_refuse_one_case() -> None:
    args = bench_large.parse_args([])
    spec = bench_large.phantom_spec(args)
    assert (spec.num_cases, spec.num_classes, spec.in_plane, spec.slices, spec.scale) == (4, 32, 512, (380, 420), 1.0)
    small = bench_large.phantom_spec(bench_large.parse_args(["--scale", "0.25", "--classes", "30"]))
    assert small.scale == 0.25 and small.num_classes == 30
    with pytest.raises(SystemExit):
        bench_large.parse_args(["--cases", "1"])


def test_rounds_alternate_which_tool_goes_first() -> None:
    sides = ["autoseg", "nnU-Net v2"]
    assert [bench_large.round_order(sides, r) for r in range(3)] == [sides, sides[::-1], sides]


def test_folder_size_counts_files_not_links(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"0" * 2**20)
    (tmp_path / "y.bin").write_bytes(b"0" * 2**19)
    (tmp_path / "link.bin").symlink_to(tmp_path / "a" / "x.bin")
    assert bench_large.folder_mb(tmp_path) == pytest.approx(1.5)
    assert bench_large.folder_mb(tmp_path / "absent") == 0.0


def _measurement(wall: float, rss: float) -> Measurement:
    return Measurement(command=["x"], wall_s=wall, peak_rss_mb=rss, peak_pss_mb=rss / 2, peak_processes=1, returncode=0)


def test_stage_rounds_sum_commands_and_take_medians() -> None:
    stage = bench_large.StageResult()
    stage.add(_measurement(10.0, 300.0), _measurement(5.0, 900.0))  # plan then preprocess: one round
    stage.add(_measurement(20.0, 100.0))
    stage.add(_measurement(12.0, 100.0))
    summary = stage.summary()
    assert stage.wall_s == [15.0, 20.0, 12.0] and summary["wall_s"] == 15.0
    assert summary["peak_rss_mb"] == 900.0 and summary["step_s"] is None


def test_table_ratios_and_targets() -> None:
    ours = {"plan_preprocess": {"wall_s": 10.0, "peak_rss_mb": 600.0}, "disk_mb": 50.0,
            "predict_nomirror": {"wall_s": 10.0, "peak_rss_mb": 100.0}}
    theirs = {"plan_preprocess": {"wall_s": 40.0, "peak_rss_mb": 1000.0}, "disk_mb": 50.0,
              "predict_nomirror": {"wall_s": 14.0, "peak_rss_mb": 1000.0}}
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in bench_large.results_table(ours, theirs).splitlines()[2:]}
    assert lines["plan + preprocess: wall s"] == ["10", "40", "0.25x", "<= 0.5x", "yes"]
    assert lines["plan + preprocess: peak RSS MB"][2:] == ["0.60x", "<= 0.5x", "no"]
    assert lines["preprocessed data on disk MB"][2:] == ["1.00x", "<= 1.0x", "yes"]
    assert lines["predict, mirroring off: wall s"][2:] == ["0.71x", "<= 0.67x (>= 1.5x speed)", "no"]  # 1.4x speed
    assert lines["predict, mirroring on: wall s"] == ["-", "-", "-", "<= 0.67x (>= 1.5x speed)", "-"]
    alone = bench_large.results_table(ours, None)
    assert "not run" in alone and "yes" not in alone


def test_our_side_alone_at_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "large.md"
    code = bench_large.main(["--work", str(tmp_path / "work"), "--out", str(out), "--cases", "2", "--classes", "6",
                             "--slices", "320", "320", "--scale", "0.0625", "--repeats", "1", "--skip-train-predict"])
    assert code == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert list(result["summaries"]) == ["autoseg"]
    ours = result["summaries"]["autoseg"]
    preprocessed = tmp_path / "work" / "autoseg_root" / "preprocessed" / bench_large.DATASET
    assert ours["disk_mb"] == pytest.approx(bench_large.folder_mb(preprocessed)) and ours["disk_mb"] > 0
    assert (preprocessed / "3d_fullres").is_dir() and (preprocessed / "splits.json").is_file()
    assert ours["plan_preprocess"]["wall_s"] > 0 and ours["plan_preprocess"]["peak_rss_mb"] > 50
    text = out.read_text()
    assert "nnU-Net NOT run: no --nnunet-venv given" in text and "2 cases (20x32x32, 20x32x32 voxels" in text
