"""DDP under torchrun (gloo on CPU) and every registered architecture through the same loop."""
import json
import os
import subprocess
import sys

import pytest

from autoseg import networks
from autoseg.contracts.checkpoint import load_checkpoint
from autoseg.training import train

from .tiny_data import DATASET, build_tiny_dataset

FAST = dict(num_workers=0, validate=False, device="cpu", validation_iterations=1)


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    build_tiny_dataset(tmp_path, dims=2, num_cases=6)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
               "-m", "autoseg", "train", DATASET, "2d", "0", "--root", str(tmp_path), "--device", "cpu",
               "--epochs", "1", "--iters-per-epoch", "2", "-np", "0", "--no-validation"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "results" / DATASET / "2d__unet" / "fold_0"
    checkpoint = load_checkpoint(folder / "checkpoint_final.pt")
    assert checkpoint["metadata"]["epoch"] == 1
    assert not any(k.startswith("module.") for k in checkpoint["network"])  # the bare network, not the DDP wrapper
    assert json.loads((folder / "environment.json").read_text())["world_size"] == 2
    # only rank 0 writes: one start line and one epoch line in the log
    log_lines = (folder / "log.txt").read_text().splitlines()
    assert sum(line.startswith("epoch 1/1") for line in log_lines) == 1


@pytest.mark.parametrize("arch,dims", [("unet2022", 2), ("unetpp", 2), ("unetrpp", 3)])
def test_other_architectures_train(tmp_path, arch, dims):
    if arch not in networks.available():
        pytest.skip(f"{arch} not registered yet")
    name = f"{'2d' if dims == 2 else '3d_fullres'}_{arch}"
    build_tiny_dataset(tmp_path, dims=dims, num_cases=5, extra_configurations=[(name, arch)])
    folder = train(DATASET, name, 0, root=tmp_path, epochs=2, iterations_per_epoch=3, **FAST)
    curves = json.loads((folder / "training_log.json").read_text())
    assert curves["train_loss"][-1] < curves["train_loss"][0]
    assert load_checkpoint(folder / "checkpoint_final.pt")["metadata"]["architecture"] == arch


def test_selfreg_on_unet(tmp_path):
    build_tiny_dataset(tmp_path, dims=2, num_cases=5)
    folder = train(DATASET, "2d", 0, root=tmp_path, epochs=1, iterations_per_epoch=2, selfreg=True, **FAST)
    assert load_checkpoint(folder / "checkpoint_final.pt")["metadata"]["selfreg"] is True
