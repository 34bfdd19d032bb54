"""Training loop on tiny data: learning, resume, budget, bad input. CPU, one thread, no workers."""
import json

import numpy as np
import pytest
import torch

from autoseg.errors import CheckpointError, ConfigurationError, PreprocessingError, TrainingError
from autoseg.training import train
from autoseg.training.checkpoint import load_checkpoint

from .tiny_data import DATASET, build_tiny_dataset

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


def test_resume_gives_identical_weights(tmp_path):
    root = tmp_path
    build_tiny_dataset(root, dims=2, num_cases=5)
    straight = train(DATASET, "2d", 1, root=root, epochs=4, iterations_per_epoch=3, seed=7, **FAST)
    reference = load_checkpoint(straight / "checkpoint_final.pt")
    for f in straight.iterdir():
        f.unlink()

    def kill_after_two(epoch, curves):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(DATASET, "2d", 1, root=root, epochs=4, iterations_per_epoch=3, seed=7, checkpoint_every=1,
              on_epoch_end=kill_after_two, **FAST)
    assert load_checkpoint(straight / "checkpoint_latest.pt")["metadata"]["epoch"] == 2
    assert not (straight / "checkpoint_final.pt").exists()
    # --continue without repeating --epochs/--iters-per-epoch keeps the interrupted run's schedule
    resumed_folder = train(DATASET, "2d", 1, root=root, seed=7, continue_training=True, **FAST)
    assert "keeping the schedule of the interrupted run (--epochs 4, --iters-per-epoch 3)" in (
        resumed_folder / "log.txt"
    ).read_text()
    resumed = load_checkpoint(resumed_folder / "checkpoint_final.pt")
    for key, value in reference["network"].items():
        assert torch.equal(value, resumed["network"][key]), key
    assert resumed["metadata"]["curves"]["train_loss"] == reference["metadata"]["curves"]["train_loss"]
    assert resumed["metadata"]["epoch"] == 4


def test_time_budget_ends_training_by_itself(tiny2d):
    folder = train(DATASET, "2d", 2, root=tiny2d, time_budget="6s", iterations_per_epoch=5, **FAST)
    timing = json.loads((folder / "timing.json").read_text())
    assert timing["time_budget_s"] == 6.0
    assert timing["elapsed_s"] <= 6.0
    meta = load_checkpoint(folder / "checkpoint_final.pt")["metadata"]
    assert meta["epoch"] >= 1 and meta["elapsed_s"] <= 6.0
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
