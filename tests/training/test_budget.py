"""--time-budget: what the budget buys (adapt_to_budget, pure) and the strict stop (end to end, tiny data)."""
import json

import pytest

from autoseg.contracts.checkpoint import load_checkpoint
from autoseg.contracts.plans import ArchitectureSpec, Configuration, Resampling
from autoseg.training import train
from autoseg.training.budget import (
    CPU_MAX_BATCH,
    TARGET_ITERATIONS,
    adapt_to_budget,
    iterations_per_epoch_for,
    scale_features,
    training_threads,
    with_stages,
    with_width,
)

from .tiny_data import DATASET, SimulatedClock, build_tiny_dataset


def _config(features=(32, 64, 128, 256, 320, 320), batch=7) -> Configuration:
    n = len(features)
    arch = ArchitectureSpec(name="anything", patch_size=[40, 56, 40], strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                            kernel_sizes=[[3, 3, 3]] * n, features=list(features))
    return Configuration(name="3d_fullres", data_identifier="3d_fullres", dims=3, target_spacing=[1, 1, 1],
                         patch_size=[40, 56, 40], batch_size=batch, median_shape=[36, 50, 35],
                         normalization=["zscore"], use_mask_for_norm=[False], resampling=Resampling(),
                         architecture=arch)


def test_scale_features_scales_caps_too_and_keeps_a_minimum():
    assert scale_features([32, 64, 128, 256, 320, 320], 0.5) == [16, 32, 64, 128, 160, 160]
    assert scale_features([32, 64, 128, 256, 320, 320], 0.25) == [8, 16, 32, 64, 80, 80]
    assert scale_features([4, 8, 16], 0.25) == [4, 4, 4]
    with pytest.raises(ValueError):
        scale_features([32], 0)


def test_with_width_and_stages_copy_without_touching_the_original():
    config = _config()
    narrow = with_width(config, 0.5)
    assert narrow.architecture.features[0] == 16 and config.architecture.features[0] == 32
    assert narrow.architecture.strides == config.architecture.strides
    shallow = with_stages(config, 4)
    assert len(shallow.architecture.features) == len(shallow.architecture.strides) == 4
    assert len(config.architecture.features) == 6


def _fake_step_time(calls):
    """Step time proportional to features[0] x batch: width 1/4 of 32 at batch 2 -> 0.1 s."""
    def measure(config, autocast):
        calls.append((config.architecture.features[0], autocast))
        return 0.1 * config.architecture.features[0] / 8 * config.batch_size / 2
    return measure


def test_cpu_budget_picks_the_widest_network_that_buys_the_target_iterations():
    calls = []
    config = _config()
    # 0.2 s (x1/2), 0.4 s (x1): 300 s buys 1500 / 750 iterations -> x 1/2 wins
    adapted, reasons, choice = adapt_to_budget(config, 300.0, "cpu", _fake_step_time(calls), bf16_supported=True)
    assert adapted.batch_size == CPU_MAX_BATCH
    assert adapted.architecture.features == [16, 32, 64, 128, 160, 160]
    assert choice.autocast == "bfloat16" and choice.width_factor == 0.5
    assert [c[0] for c in calls] == [16, 32]  # narrowest first, stops at the first miss
    assert all(c[1] == "bfloat16" for c in calls)
    assert choice.seconds_per_iteration == pytest.approx(0.2)
    assert choice.iterations_per_epoch == iterations_per_epoch_for(300.0, 0.2) == 75
    assert any("features" in r for r in reasons) and any("batch 7 -> 2" in r for r in reasons)
    assert config.batch_size == 7 and config.architecture.features[0] == 32  # input untouched


def test_tiny_budget_takes_the_narrowest_and_a_huge_one_keeps_the_plan():
    adapted, _, choice = adapt_to_budget(_config(), 20.0, "cpu", _fake_step_time([]), bf16_supported=False)
    assert adapted.architecture.features[0] == 16 and choice.autocast is None
    adapted, _, choice = adapt_to_budget(_config(), 10_000.0, "cpu", _fake_step_time([]), bf16_supported=False)
    assert adapted.architecture.features[0] == 32 and choice.width_factor == 1.0
    assert 10_000.0 / choice.seconds_per_iteration >= TARGET_ITERATIONS


def test_cuda_budget_keeps_the_plan():
    config = _config()
    adapted, _, choice = adapt_to_budget(config, 300.0, "cuda", None)
    assert adapted == config and choice.autocast is None and choice.iterations_per_epoch is None


def test_iterations_per_epoch_bounds_and_threads():
    assert iterations_per_epoch_for(10.0, 1.0) == 10
    assert iterations_per_epoch_for(1e6, 0.01) == 250
    assert training_threads(2, cores=2) == 1 and training_threads(0, cores=2) == 2
    assert training_threads(2, cores=16) == 14 and training_threads(4, cores=1) == 1


def test_strict_budget_ends_mid_epoch_with_checkpoint_and_validation(tmp_path):
    """An epoch that would take minutes (10000 iterations) under a budget: training stops mid-epoch by itself,
    within the budget, with the final checkpoint and validation outputs. On a simulated clock, so the same run
    makes the same decisions on any machine, however loaded (run twice: identical)."""
    build_tiny_dataset(tmp_path, dims=2, num_cases=5)
    budget = 3.0
    runs = []
    for attempt in range(2):
        folder = train(DATASET, "2d", 0, root=tmp_path, iterations_per_epoch=10_000, num_workers=0, device="cpu",
                       time_budget=f"{budget:g}s", clock=SimulatedClock(), force=attempt > 0)
        runs.append(load_checkpoint(folder / "checkpoint_final.pt")["metadata"])
    meta = runs[0]
    assert runs[1]["iterations_done"] == meta["iterations_done"] and runs[1]["elapsed_s"] == meta["elapsed_s"]
    timing = json.loads((folder / "timing.json").read_text())
    assert timing["elapsed_s"] <= budget and meta["elapsed_s"] <= budget
    assert meta["epoch"] == 1 and 0 < meta["iterations_done"] < 10_000  # ended mid-epoch
    assert (folder / "validation" / "summary.json").is_file() and (folder / "validation" / "case_000.nii.gz").is_file()
    choice = meta["budget_choice"]
    assert choice["seconds_per_iteration"] > 0 and meta["budget_reasons"]
    # the (possibly adapted) configuration in the metadata is what inference rebuilds
    assert meta["configuration"]["architecture"]["features"] == scale_features([4, 8, 16], choice["width_factor"])
    assert meta["configuration"]["batch_size"] == 2 and choice["num_threads"] == 1  # conftest: one thread
    lr = json.loads((folder / "training_log.json").read_text())["lr"]
    assert lr[-1] < 0.01 * 0.8  # the poly schedule ran over the (simulated) clock (half is kept for validation)


def test_continue_with_budget_carries_elapsed_time_and_configuration(tmp_path):
    build_tiny_dataset(tmp_path, dims=2, num_cases=5)
    folder = train(DATASET, "2d", 1, root=tmp_path, num_workers=0, device="cpu", validate=False, time_budget="4s")
    first = load_checkpoint(folder / "checkpoint_final.pt")["metadata"]
    folder = train(DATASET, "2d", 1, root=tmp_path, num_workers=0, device="cpu", validate=False, time_budget="7s",
                   continue_training=True)
    second = load_checkpoint(folder / "checkpoint_final.pt")["metadata"]
    assert first["elapsed_s"] < second["elapsed_s"] <= 7.0 + 1.0
    assert second["iterations_done"] > first["iterations_done"]
    assert second["configuration"] == first["configuration"]
    assert second["budget_choice"] == first["budget_choice"]
