"""Light tests of benchmarks/accuracy.py (pure helpers only: no nnU-Net runs, no training)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other as top-level modules (python benchmarks/x.py)

import accuracy  # noqa: E402
import common  # noqa: E402


def test_recipe_command_rewrites_out_and_counts(tmp_path):
    recipe = "python ../shared/bench/make_synthetic.py OUT/Dataset970_SynthMR -n 20 --seed 0\n"
    args, out = accuracy.recipe_command(recipe, tmp_path / "raw", repo=tmp_path / "repo")
    assert out == tmp_path / "raw" / "Dataset970_SynthMR"
    assert args == [str(tmp_path / "shared/bench/make_synthetic.py"), str(out), "-n", "20", "--seed", "0",
                    "--n-test", "4"]
    small, _ = accuracy.recipe_command(recipe, tmp_path / "raw", repo=tmp_path / "repo", n_cases=6)
    assert small[2:] == ["-n", "6", "--seed", "0", "--n-test", "4"]
    with pytest.raises(common.BenchmarkError):
        accuracy.recipe_command("make it somehow", tmp_path)


def test_oracle_folder_by_name_number_and_short_name(tmp_path):
    (tmp_path / "Dataset970_SynthMR").mkdir()
    (tmp_path / "Dataset970_SynthMR" / "recipe.txt").write_text("python x OUT/Dataset970_SynthMR")
    for ident in ("Dataset970_SynthMR", "970", "synthmr"):
        assert accuracy.oracle_folder(ident, tmp_path) == tmp_path / "Dataset970_SynthMR"
    assert accuracy.oracle_folder("4", tmp_path) is None


def test_pick_configuration():
    assert accuracy.pick_configuration(["2d", "3d_fullres", "3d_lowres"]) == "3d_fullres"
    assert accuracy.pick_configuration(["2d", "2d_unet2022"]) == "2d"
    assert accuracy.pick_configuration(["2d", "3d_fullres"], "2d") == "2d"
    with pytest.raises(common.BenchmarkError):
        accuracy.pick_configuration(["2d"], "3d_fullres")


def test_score_rows_side_by_side():
    ours = {"mean": {"1": {"dice": 0.9, "hd95": 1.5}, "2": {"dice": 0.7, "hd95": None}},
            "foreground_mean": {"dice": 0.8, "hd95": 1.5}}
    theirs = {"mean": {"1": {"dice": 0.85, "hd95": 2.0}, "2": {"dice": 0.75, "hd95": 3.0}},
              "foreground_mean": {"dice": 0.8, "hd95": 2.5}}
    rows = accuracy.score_rows([1, 2], {"1": "core", "2": "shell"}, ours, theirs)
    assert rows == [["1 core", "0.900", "0.850", "+0.050", "1.50", "2.00"],
                    ["2 shell", "0.700", "0.750", "-0.050", "-", "3.00"],
                    ["foreground mean", "0.800", "0.800", "+0.000", "1.50", "2.50"]]
    only_ours = accuracy.score_rows([1], {}, ours, None)
    assert only_ours[0] == ["1", "0.900", "-", "-", "1.50", "-"]


def test_stage_rows_ratio():
    def m(wall):
        return common.Measurement(["x"], wall, 100.0, 80.0, 1, 0)

    rows = accuracy.stage_rows({"plan": m(10.0), "train": m(60.0)}, {"plan": m(20.0), "train": m(60.0)})
    assert rows[0] == ["plan", "10.0 s", "20.0 s", "0.50", "80 MB", "80 MB"]
    assert [r[0] for r in rows] == ["plan", "train"]


def test_link_predictions_only_requested_cases(tmp_path):
    source = tmp_path / "validation"
    source.mkdir()
    for case in ("a", "b"):
        (source / f"{case}.nii.gz").write_bytes(b"x")
    (source / "summary.json").write_text("{}")
    target = accuracy.link_predictions(source, tmp_path / "score", ["a", "missing"], ".nii.gz")
    assert sorted(p.name for p in target.iterdir()) == ["a.nii.gz"]
    assert (target / "a.nii.gz").resolve() == (source / "a.nii.gz").resolve()


def test_describe_training_flags_overrun():
    line = accuracy.describe_training({"epochs": 3, "iterations": 154, "training_ended_s": 50.0, "elapsed_s": 58.0},
                                      budget_s=60.0)
    assert line == "3 epochs, 154 iterations, training ended at 50 s, done (with final validation) at 58 s of 60 s"
    over = accuracy.describe_training({"epochs": 1, "elapsed_s": 326.0}, budget_s=60.0)
    assert "266 s OVER the budget" in over


def _result(sides, date="2026-11-23 21:00", budget_s=1200.0, cases=("a", "b")):
    return {"dataset": "Dataset201_X", "configuration": "2d", "fold": 0, "budget_s": budget_s, "device": "cpu",
            "date": date, "versions": {name: "1" for name in sides},
            "sets": {"fold 0 validation": {"num_cases": len(cases), "case_ids": list(cases)}},
            "sides": {name: {"name": name, "stages": {}, "scores": {}, "training": {}} for name in sides}}


def test_merge_previous_side_fills_only_the_skipped_side():
    new = _result(["nnU-Net"], date="2026-11-23 22:30")
    new["versions"] = {"autoseg": "0.1.0", "nnunetv2": "2.8.1"}
    previous = _result(["autoseg", "nnU-Net"])
    previous["sides"]["nnU-Net"]["training"] = {"epochs": 99}
    merged = accuracy.merge_previous_side(new, previous)
    assert set(merged["sides"]) == {"autoseg", "nnU-Net"}
    assert merged["sides"]["autoseg"]["from_run"] == "2026-11-23 21:00"
    assert merged["sides"]["nnU-Net"]["training"] == {}  # this run's nnU-Net side wins over the old one
    assert "from_run" not in merged["sides"]["nnU-Net"]
    assert new["sides"].keys() == {"nnU-Net"}  # the input is not modified
    assert "results of the run of 2026-11-23 21:00" in accuracy.render_markdown(
        {**merged, "machine": {"cpu": "x", "cores": 2, "memory_gib": 1}, "num_train": 1, "num_val": 2, "budget": "20m",
         "labels": [], "label_names": {}})


@pytest.mark.parametrize("change", [{"budget_s": 60.0}, {"cases": ("a", "c")}])
def test_merge_previous_side_refuses_a_different_measurement(change):
    with pytest.raises(common.BenchmarkError, match="not be comparable"):
        accuracy.merge_previous_side(_result(["nnU-Net"]), _result(["autoseg"], **change))


def test_already_trained_names_existing_fold_folders_of_the_sides_that_run(tmp_path):
    ours, theirs = tmp_path / "ours" / "fold_0", tmp_path / "theirs" / "fold_0"
    theirs.mkdir(parents=True)
    assert accuracy.already_trained(ours, theirs) == [theirs]
    assert accuracy.already_trained(ours, None) == []  # nnU-Net skipped: its old fold does not matter
