import pytest
import torch

from autoseg.contracts.checkpoint import (
    CHECKPOINT_METADATA_SCHEMA_VERSION,
    CheckpointMetadata,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from autoseg.errors import CheckpointError
from autoseg.training.checkpoint import capture_rng_state


def _metadata() -> CheckpointMetadata:
    return CheckpointMetadata.from_json({"configuration": {"name": "2d"}, "architecture": "unet", "in_channels": 1,
                                         "num_classes": 3, "epoch": 2, "curves": {"train_loss": [1.0, 0.5]}})


def test_roundtrip_weights_only_with_optimizer_and_rng(tmp_path):
    net = torch.nn.Conv2d(1, 2, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    net(torch.randn(1, 1, 5, 5)).sum().backward()
    opt.step()
    ckpt = make_checkpoint(net.state_dict(), _metadata(), opt.state_dict(), {"lr": 0.01}, capture_rng_state())
    path = save_checkpoint(ckpt, tmp_path / "c.pt")
    loaded = torch.load(path, weights_only=True)  # the contract: plain weights_only load works
    assert loaded["format"] == "autoseg-checkpoint"
    checked = load_checkpoint(path)
    assert torch.equal(checked["network"]["weight"], net.weight.detach())
    assert checked["metadata"]["curves"]["train_loss"] == [1.0, 0.5]
    opt2 = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    opt2.load_state_dict(checked["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])


def test_corrupted_truncated_and_foreign_files_raise_checkpoint_error(tmp_path):
    net = torch.nn.Linear(2, 2)
    good = save_checkpoint(make_checkpoint(net.state_dict(), _metadata()), tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer"}, foreign)
    for path in (truncated, garbage, foreign, tmp_path / "missing.pt"):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert path.name in str(info.value)
    assert load_checkpoint(good)["metadata"]["num_classes"] == 3


def test_failed_save_leaves_previous_file_intact(tmp_path):
    net = torch.nn.Linear(2, 2)
    path = save_checkpoint(make_checkpoint(net.state_dict(), _metadata()), tmp_path / "c.pt")
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint({"bad": lambda x: x}, path)  # unpicklable: torch.save fails midway
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


# metadata exactly as the trainer wrote it before CheckpointMetadata existed (no schema_version)
TRAINER_METADATA = {
    "dataset_name": "Dataset001_X", "configuration": {"name": "2d"}, "plans": {"dataset_name": "Dataset001_X"},
    "fold": 0, "epoch": 3, "architecture": "unet", "in_channels": 1, "num_classes": 3, "selfreg": False,
    "curves": {"train_loss": [1.0]}, "ema_pseudo_dice": 0.5, "best_ema_pseudo_dice": 0.5, "elapsed_s": 12.5,
    "seconds_per_patch": 0.01, "seed": 12345, "epochs": 4, "iterations_per_epoch": 2, "time_budget_s": None,
    "iterations_done": 6, "budget_choice": None, "budget_reasons": [], "epoch_iteration": 0, "epoch_losses": [],
}


def test_metadata_reads_checkpoints_written_before_the_schema_version_and_writes_it():
    metadata = CheckpointMetadata.from_json(dict(TRAINER_METADATA), "c.pt")
    assert (metadata.epoch, metadata.in_channels, metadata.fold, metadata.elapsed_s) == (3, 1, 0, 12.5)
    # the file gains only the version: every other key and value is what the trainer wrote before
    assert metadata.to_json() == {**TRAINER_METADATA, "schema_version": CHECKPOINT_METADATA_SCHEMA_VERSION}
    assert CheckpointMetadata.from_json(metadata.to_json()) == metadata


def test_metadata_defaults_are_what_readers_assumed_for_missing_keys():
    # the fixtures of tests/inference write only the keys inference needs
    minimal = CheckpointMetadata.from_json({"configuration": {"name": "2d"}, "architecture": "unet",
                                            "in_channels": "2", "num_classes": 3})
    assert (minimal.in_channels, minimal.epoch, minimal.best_ema_pseudo_dice, minimal.selfreg) == (2, None, -1.0, None)
    assert (minimal.curves, minimal.budget_reasons, minimal.epoch_losses) == ({}, [], [])
    with pytest.raises(KeyError):
        minimal.parsed_plans()


@pytest.mark.parametrize("change, message", [
    ({"schema_version": CHECKPOINT_METADATA_SCHEMA_VERSION + 1}, "newer than this autoseg supports .*upgrade autoseg"),
    ({"colour": "blue"}, "unknown field\\(s\\) colour"),
    ({"in_channels": None}, "lacks metadata.in_channels"),
    ({"num_classes": "three"}, "unreadable checkpoint metadata"),
    ({"configuration": ["2d"]}, "configuration is a list, expected a dict"),
])
def test_metadata_refuses_newer_unknown_missing_and_mistyped(change, message):
    data = {**TRAINER_METADATA, **change}
    if change.get("in_channels", 0) is None:
        del data["in_channels"]
    with pytest.raises(CheckpointError, match=f"^c.pt: .*{message}"):
        CheckpointMetadata.from_json(data, "c.pt")


def test_load_checkpoint_refuses_metadata_without_a_required_field(tmp_path):
    net = torch.nn.Linear(2, 2)
    checkpoint = make_checkpoint(net.state_dict(), _metadata())
    del checkpoint["metadata"]["num_classes"]
    path = save_checkpoint(checkpoint, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="lacks metadata.num_classes; the file is incomplete"):
        load_checkpoint(path)
