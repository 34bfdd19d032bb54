import random

import numpy as np
import pytest
import torch

from autoseg.errors import CheckpointError
from autoseg.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    make_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _metadata():
    return {"configuration": {"name": "2d"}, "architecture": "unet", "in_channels": 1, "num_classes": 3,
            "epoch": 2, "curves": {"train_loss": [1.0, 0.5]}}


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


def test_rng_state_restores_all_three_generators():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


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
