"""Training loop on tiny data: learning, resume, budget, bad input. CPU, one thread, no workers."""
import json
import os
import signal

import numpy as np
import pytest
import torch

from autoseg.contracts.checkpoint import load_checkpoint
from autoseg.errors import (
    CheckpointError,
    ConfigurationError,
    PreprocessingError,
    TrainingError,
    TrainingInterrupted,
)
from autoseg.training import train

from .tiny_data import DATASET, SimulatedClock, build_tiny_dataset

FAST = dict(num_workers=0, validate=False, device="cpu", validation_iterations=2)


def _curves(folder):
    return json.loads((folder / "training_log.json").read_text())


def test_unet_2d_learns(tiny2d):
    folder = train(DATASET, "2d", 0, root=tiny2d, epochs=5, iterations_per_epoch=8, **FAST)
    curves = _curves(folder)
    assert set(curves) >= {"epochs", "train_loss", "val_loss", "pseudo_dice", "lr", "epoch_time"}
    assert curves["epochs"] == [1, 2, 3, 4, 5]
    assert curves["train_loss"][-1] < 0.75 * curves["train_loss"][0]
    assert max(curves["pseudo_dice"][-1]) > max(curves["pseudo_dice"][0]) and max(curves["pseudo_dice"][-1]) > 0.4
    assert curves["lr"][0] == pytest.approx(0.01) and curves["lr"][-1] == pytest.approx(0.01 * 0.2**0.9)
    for name in ("checkpoint_final.pt", "checkpoint_best.pt", "checkpoint_latest.pt", "progress.png", "log.txt",
                 "plans.json", "environment.json"):
        assert (folder / name).is_file(), name
    meta = load_checkpoint(folder / "checkpoint_final.pt")["metadata"]
    assert meta["epoch"] == 5 and meta["fold"] == 0 and meta["architecture"] == "unet"
    assert meta["configuration"]["name"] == "2d" and meta["curves"]["train_loss"] == curves["train_loss"]
    assert len((folder / "log.txt").read_text().splitlines()) >= 6


@pytest.mark.slow
def test_unet_3d_loss_goes_down(tiny3d):
    folder = train(DATASET, "3d_fullres", 0, root=tiny3d, epochs=4, iterations_per_epoch=10, **FAST)
    curves = _curves(folder)
    assert curves["train_loss"][-1] < 0.7 * curves["train_loss"][0]
    assert curves["val_loss"][-1] < curves["val_loss"][0]


RUN = dict(epochs=4, iterations_per_epoch=3, seed=7)  # the run the resume tests interrupt and compare


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Final checkpoint of RUN on fold 1 straight through, batches made in-process (-np 0)."""
    import autoseg.training.trainer as trainer

    root = tmp_path_factory.mktemp("straight")
    build_tiny_dataset(root, dims=2, num_cases=5)
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:  # one thread, as conftest gives each test (set up after this)
        patch.setattr(trainer, "configure_threads", lambda num_threads=None: 1)
        torch.set_num_threads(1)
        reference = load_checkpoint(train(DATASET, "2d", 1, root=root, **RUN, **FAST) / "checkpoint_final.pt")
    torch.set_num_threads(threads)
    return reference


def assert_same_run(folder, reference):
    resumed = load_checkpoint(folder / "checkpoint_final.pt")
    for key, value in reference["network"].items():
        assert torch.equal(value, resumed["network"][key]), key
    assert resumed["metadata"]["curves"]["train_loss"] == reference["metadata"]["curves"]["train_loss"]
    assert resumed["metadata"]["epoch"] == 4


def test_resume_with_workers_gives_identical_weights(tmp_path, uninterrupted):
    """Issue 18.9: with the default two loader processes a resumed run differed; now batches depend only on
    (seed, iteration), so -np 2 interrupted and resumed equals -np 0 straight through."""
    build_tiny_dataset(tmp_path, dims=2, num_cases=5)

    def kill_after_two(epoch, curves):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="checkpoint_latest.pt is saved: resume with `autoseg train "
                       f"{DATASET} 2d 1 --root .* --continue`") as interrupted:
        train(DATASET, "2d", 1, root=tmp_path, **RUN, **{**FAST, "num_workers": 2}, checkpoint_every=1,
              on_epoch_end=kill_after_two)
    assert interrupted.value.exit_code == 130
    folder = tmp_path / "results" / DATASET / "2d__unet" / "fold_1"
    assert load_checkpoint(folder / "checkpoint_latest.pt")["metadata"]["epoch"] == 2
    assert not (folder / "checkpoint_final.pt").exists()
    # --continue without repeating any option resumes the interrupted run (run.json), here with its 2 workers
    resumed_folder = train(DATASET, "2d", 1, root=tmp_path, continue_training=True, validate=False, device="cpu",
                           validation_iterations=2)
    assert "keeping the run's options (--iters-per-epoch 3, --seed 7, --epochs 4)" in (
        resumed_folder / "log.txt"
    ).read_text()
    assert json.loads((folder / "run.json").read_text())["num_workers"] == 2
    assert_same_run(resumed_folder, uninterrupted)


def test_sigterm_saves_mid_epoch_and_resumes_identically(tmp_path, monkeypatch, uninterrupted):
    """Issue 18.5b: a cluster's SIGTERM used to lose everything since the last 50-epoch/10-minute save; now the
    run saves checkpoint_latest.pt at the next iteration boundary, exits 143, and resumes mid-epoch exactly."""
    import autoseg.training.loop as loop

    build_tiny_dataset(tmp_path, dims=2, num_cases=5)
    step = loop.train_step

    def step_then_signal(*args):
        loss = step(*args)
        epoch, iteration = args[3], args[4]
        if (epoch, iteration) == (1, 0):
            os.kill(os.getpid(), signal.SIGTERM)  # delivered now; training must finish this step first
        return loss

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    with pytest.raises(TrainingInterrupted, match="SIGTERM at epoch 1 iteration 1; checkpoint_latest.pt is saved"
                       ) as interrupted:
        train(DATASET, "2d", 1, root=tmp_path, **RUN, **FAST)
    assert interrupted.value.exit_code == 143
    folder = tmp_path / "results" / DATASET / "2d__unet" / "fold_1"
    metadata = load_checkpoint(folder / "checkpoint_latest.pt")["metadata"]
    assert (metadata["epoch"], metadata["epoch_iteration"], len(metadata["epoch_losses"])) == (1, 1, 1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the loop
    monkeypatch.setattr(loop, "train_step", step)
    assert_same_run(train(DATASET, "2d", 1, root=tmp_path, continue_training=True, **FAST), uninterrupted)


def test_latest_checkpoint_saved_within_the_interval_mid_epoch(tmp_path, monkeypatch):
    """Issue 18.5b: latest was saved only at the end of an epoch (every 50, or after 10 minutes), so a kill
    during a long first epoch lost all of it; now the interval is checked at every iteration boundary."""
    import autoseg.training.loop as loop

    build_tiny_dataset(tmp_path, dims=2, num_cases=5)
    latest = tmp_path / "results" / DATASET / "2d__unet" / "fold_0" / "checkpoint_latest.pt"
    step, seen = loop.train_step, []

    def step_and_look(*args):
        seen.append(load_checkpoint(latest)["metadata"]["epoch_iteration"] if latest.exists() else None)
        return step(*args)

    monkeypatch.setattr(loop, "train_step", step_and_look)
    train(DATASET, "2d", 0, root=tmp_path, epochs=1, iterations_per_epoch=3, checkpoint_every=100,
          checkpoint_interval_s=0.0, **FAST)
    assert seen == [0, 1, 2]  # a zero interval: saved before each iteration, with the iteration it resumes at


def test_time_budget_ends_training_by_itself(tiny2d):
    # a simulated clock: the stop depends on the policy, not on how loaded the machine is, so the bound is exact
    folder = train(DATASET, "2d", 2, root=tiny2d, time_budget="2s", iterations_per_epoch=5, clock=SimulatedClock(),
                   **FAST)
    timing = json.loads((folder / "timing.json").read_text())
    assert timing["time_budget_s"] == 2.0 and timing["elapsed_s"] <= 2.0
    meta = load_checkpoint(folder / "checkpoint_final.pt")["metadata"]
    assert meta["epoch"] >= 2 and meta["elapsed_s"] <= timing["elapsed_s"]
    lrs = _curves(folder)["lr"]
    assert lrs[-1] < lrs[0]  # the schedule ran over the budget, not over a fixed number of epochs


def test_missing_preprocessed_data_says_run_plan(tmp_path):
    (tmp_path / "raw" / DATASET).mkdir(parents=True)
    with pytest.raises(PreprocessingError, match="autoseg plan"):
        train(DATASET, "2d", 0, root=tmp_path, **FAST)


def test_unknown_configuration_and_fold(tiny2d):
    with pytest.raises(ConfigurationError, match="no configuration '3d_lowres'"):
        train(DATASET, "3d_lowres", 0, root=tiny2d, **FAST)
    with pytest.raises(ConfigurationError, match="fold '7'"):
        train(DATASET, "2d", "7", root=tiny2d, **FAST)
    with pytest.raises(ConfigurationError, match="fold 'x'"):
        train(DATASET, "2d", "x", root=tiny2d, **FAST)


def test_corrupted_checkpoint_is_an_error_not_a_restart(tmp_path):
    build_tiny_dataset(tmp_path, dims=2, num_cases=5)
    folder = tmp_path / "results" / DATASET / "2d__unet" / "fold_0"
    folder.mkdir(parents=True)
    (folder / "checkpoint_latest.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="checkpoint_latest.pt"):
        train(DATASET, "2d", 0, root=tmp_path, epochs=1, iterations_per_epoch=1, continue_training=True, **FAST)


def test_nan_in_batch_stops_with_clear_message(tmp_path):
    build_tiny_dataset(tmp_path, dims=2, num_cases=5)
    store = tmp_path / "preprocessed" / DATASET / "2d"
    from autoseg.preprocessing.store import list_stored_cases, load_case, save_array

    for case_id in list_stored_cases(store):  # whichever array format the store holds
        array = load_case(store, case_id, mmap=False)[0]
        array[:] = np.nan
        save_array(store, case_id, array)
    with pytest.raises(TrainingError, match="NaN"):
        train(DATASET, "2d", 0, root=tmp_path, epochs=1, iterations_per_epoch=2, **FAST)


def test_final_validation_writes_predictions_and_summary(tmp_path):
    pytest.importorskip("autoseg.inference")
    try:
        from autoseg.evaluation import evaluate_folders  # noqa: F401
        from autoseg.inference import Predictor  # noqa: F401
        from autoseg.preprocessing import restore_probabilities  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"inference/evaluation not available yet: {exc}")
    build_tiny_dataset(tmp_path, dims=2, num_cases=5)
    folder = train(DATASET, "2d", 0, root=tmp_path, epochs=2, iterations_per_epoch=4, num_workers=0, device="cpu",
                   validation_iterations=1, time_budget="40s")
    validation = folder / "validation"
    (case,) = ["case_000"]  # fold 0 of the tiny splits validates case_000
    segmentation = validation / f"{case}.nii.gz"
    assert segmentation.is_file()
    from autoseg.io import read_segmentation

    seg, geometry = read_segmentation(segmentation)
    _, reference_geometry = read_segmentation(tmp_path / "raw" / DATASET / "labelsTr" / f"{case}.nii.gz")
    assert seg.shape == tuple(reference_geometry.shape)
    probabilities = np.load(validation / f"{case}.npz")["probabilities"]
    assert probabilities.dtype == np.float16 and probabilities.shape == (3, *seg.shape)
    assert np.allclose(probabilities.astype(np.float32).sum(0), 1.0, atol=0.02)
    assert (validation / "summary.json").is_file()
    assert json.loads((folder / "timing.json").read_text())["elapsed_s"] <= 40.0


def test_loss_and_schedule_are_run_options_recorded_and_kept_by_continue(tmp_path):
    build_tiny_dataset(tmp_path, dims=2, num_cases=5)
    folder = train(DATASET, "2d", 0, root=tmp_path, epochs=1, iterations_per_epoch=2, lr_schedule="poly-warmup",
                   loss="dice_ce", **FAST)
    run = json.loads((folder / "run.json").read_text())
    assert (run["loss"], run["lr_schedule"]) == ("dice_ce", "poly-warmup")
    checkpoint = load_checkpoint(folder / "checkpoint_final.pt")
    assert checkpoint["scheduler"]["kind"] == "poly-warmup" and checkpoint["scheduler"]["warmup_fraction"] == 0.05
    assert _curves(folder)["lr"][0] < 0.01  # warm-up: the first epoch does not start at the full rate
    with pytest.raises(ConfigurationError, match="--lr-schedule poly differs from the run being continued"):
        train(DATASET, "2d", 0, root=tmp_path, epochs=2, iterations_per_epoch=2, lr_schedule="poly",
              continue_training=True, **FAST)
    with pytest.raises(ConfigurationError, match="unknown loss"):
        train(DATASET, "2d", 1, root=tmp_path, epochs=1, iterations_per_epoch=2, loss="nope", **FAST)
    assert not (folder.parent / "fold_1").exists()  # refused before anything was written


def test_region_and_ignore_datasets_are_refused_in_one_line_before_anything_is_written(tmp_path):
    from autoseg.dataset.synthetic import SyntheticSpec, generate
    from autoseg.pipeline import plan_dataset

    for kind, name in (("regions", "Dataset981_Regions"), ("sparse", "Dataset982_Sparse")):
        generate(tmp_path / "raw" / name, SyntheticSpec(kind=kind, num_cases=5, shape=(8, 20, 20),
                                                        spacing=(2.0, 1.0, 1.0)))
        plan_dataset(name, root=tmp_path, configurations=["3d_fullres"], num_workers=1, gpu_memory_gb=8)
        with pytest.raises(ConfigurationError, match="cannot train them yet") as refused:
            train(name, "3d_fullres", 0, root=tmp_path, epochs=1, iterations_per_epoch=1, **FAST)
        assert "\n" not in str(refused.value) and not (tmp_path / "results" / name).exists()
