"""The planner's GPU budget comes from the GPU (CUDA device 0), 8 GB without CUDA; --gpu-memory overrides.
CUDA is faked with monkeypatch: these tests run on CPU machines."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from autoseg import device


def _fake_cuda(monkeypatch, total_memory: int, name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(total_memory=total_memory, name=name))


def test_gpu_budget_comes_from_the_cuda_device(monkeypatch):
    _fake_cuda(monkeypatch, 150_110_011_392, "NVIDIA H200")  # what an H200 reports: 139.8 GiB
    assert device.gpu_memory_budget() == (
        139.8, "GPU memory budget: 139.8 GB from NVIDIA H200; --gpu-memory overrides"
    )
    assert device.gpu_memory_budget(24) == (24.0, "GPU memory budget: 24 GB from --gpu-memory")


def test_gpu_budget_without_cuda_is_8_gb_and_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gigabytes, source = device.gpu_memory_budget(None)
    assert gigabytes == 8.0
    assert source == "GPU memory budget: 8 GB (the default: PyTorch sees no CUDA GPU); --gpu-memory overrides"
    assert device.gpu_memory_budget(0.5)[0] == 0.5


def test_plan_dataset_uses_the_device_budget_and_the_flag_overrides_it(tmp_path, monkeypatch, capsys):
    from autoseg.cli import build_parser
    from autoseg.dataset.synthetic import SyntheticSpec, generate
    from autoseg.pipeline import plan_dataset

    assert build_parser().parse_args(["plan", "4"]).gpu_memory is None  # None: ask the device
    generate(tmp_path / "raw" / "Dataset905_Budget", SyntheticSpec(num_cases=4, shape=(8, 24, 24)))
    _fake_cuda(monkeypatch, 12 * 2**30, "Fake GPU 12GB")
    plans = plan_dataset("905", root=tmp_path, architectures=["unet"], configurations=["3d_fullres"],
                         preprocess=False, num_workers=1)
    assert plans.gpu_memory_gb == 12.0
    assert "GPU memory budget: 12 GB from Fake GPU 12GB; --gpu-memory overrides" in capsys.readouterr().out
    plans = plan_dataset("905", root=tmp_path, gpu_memory_gb=3.0, architectures=["unet"],
                         configurations=["3d_fullres"], preprocess=False, num_workers=1)
    assert plans.gpu_memory_gb == 3.0
    assert "GPU memory budget: 3 GB from --gpu-memory" in capsys.readouterr().out
