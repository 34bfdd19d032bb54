"""Light tests of benchmarks/nnunet_side.py (pure helpers only: no nnU-Net runs, no training)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other as top-level modules (python benchmarks/x.py)

import common  # noqa: E402
import nnunet_side  # noqa: E402


def test_dataset_number():
    assert nnunet_side.dataset_number("Dataset970_SynthMR") == 970
    assert nnunet_side.dataset_number_of("Dataset004_Hippocampus") == 4
    assert nnunet_side.dataset_number_of("12") == 12
    with pytest.raises(common.BenchmarkError, match="DatasetXXX_Name"):
        nnunet_side.dataset_number("Task04_Hippocampus")


def test_splits_written_in_nnunet_format(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "nnUNetv2_train").touch()  # enough for the constructor; nothing is run
    raw = tmp_path / "Dataset970_SynthMR"
    raw.mkdir()
    (raw / "dataset.json").write_text("{}")
    ours = tmp_path / "splits.json"
    folds = [{"train": ["b", "c"], "val": ["a"]}, {"train": ["a", "c"], "val": ["b"]}]
    ours.write_text(json.dumps(folds))

    tool = nnunet_side.NnUNet(venv, tmp_path / "work")
    assert tool.link_raw(raw) == "Dataset970_SynthMR"
    assert tool.link_raw(raw) == "Dataset970_SynthMR"  # idempotent
    assert (tool.raw / "Dataset970_SynthMR").resolve() == raw.resolve()
    path = tool.write_splits(970, ours)
    assert path == tool.preprocessed / "Dataset970_SynthMR" / "splits_final.json"
    assert json.loads(path.read_text()) == folds
    env = tool.env()
    assert env["nnUNet_raw"] == str(tool.raw) and env["nnUNet_results"] == str(tool.results)
    assert os.environ.get("nnUNet_raw") != str(tool.raw)  # only the children get it


def test_splits_checked_against_nnunet_cases(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "nnUNetv2_train").touch()
    tool = nnunet_side.NnUNet(venv, tmp_path / "work")
    folder = tool.preprocessed / "Dataset970_SynthMR"
    (folder / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(
        {"configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres"}}}))
    for case in ("a", "b"):
        (folder / "nnUNetPlans_3d_fullres" / f"{case}.pkl").touch()
    with pytest.raises(common.BenchmarkError, match="did not preprocess.*'c'"):
        tool.write_splits("Dataset970_SynthMR", [{"train": ["a", "c"], "val": ["b"]}])


@pytest.mark.parametrize("bad", [[], {"train": []}, [{"train": ["a"]}], [{"train": "a", "val": []}]])
def test_validate_splits_rejects(bad):
    with pytest.raises(common.BenchmarkError):
        nnunet_side.validate_splits(bad)


def test_budget_driver_plan_epochs():
    # runs in the nnU-Net venv normally; plan_epochs is pure Python and importable anywhere
    import nnunet_budget_driver as driver

    calibration = {"train_step_s": 1.0, "val_step_s": 0.5, "checkpoint_save_s": 0.3}
    plan = driver.plan_epochs(time_left_s=1000.0, reserve_s=100.0, calibration=calibration, nominal=50)
    per_epoch = 50 * (1.0 + 0.2 * 0.5) + 0.3 + driver.PLOT_AND_LOG_S
    assert plan["num_epochs"] == int(900 // per_epoch) == 16
    # 16 nominal epochs leave 900 - 16 x 56 s idle: the iterations per epoch grow to fill it
    assert plan["num_iterations_per_epoch"] == int((900 / 16 - 1.0) // 1.1) == 50
    one_and_a_half = driver.plan_epochs(time_left_s=100.0 + 1.5 * per_epoch, reserve_s=100.0,
                                        calibration=calibration, nominal=50)
    assert one_and_a_half["num_epochs"] == 1
    assert one_and_a_half["num_iterations_per_epoch"] == int((1.5 * per_epoch - 1.0) // 1.1) == 75
    assert one_and_a_half["num_val_iterations_per_epoch"] == 15
    assert one_and_a_half["per_epoch_estimate_s"] <= 1.5 * per_epoch
    short = driver.plan_epochs(time_left_s=40.0, reserve_s=10.0, calibration=calibration, nominal=50)
    assert short["num_epochs"] == 1
    assert short["num_iterations_per_epoch"] == int((30.0 - 1.0) // 1.1)
    none_left = driver.plan_epochs(time_left_s=5.0, reserve_s=10.0, calibration=calibration, nominal=50)
    assert none_left["num_epochs"] == 1 and none_left["num_iterations_per_epoch"] == 1


def test_budget_driver_imports_nothing_heavy_at_top_level():
    # nnU-Net's spawn pools re-import the driver in every worker: it must stay standard library only
    code = ("import sys; sys.path.insert(0, %r); import nnunet_budget_driver; "
            "print(any(m in sys.modules for m in ('torch', 'nnunetv2', 'numpy', 'autoseg')))" % str(BENCHMARKS))
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"


