import pytest
from pathlib import Path

from .tiny_data import build_tiny_dataset


@pytest.fixture(scope="session")
def tiny3d(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny3d")
    build_tiny_dataset(root, dims=3)
    return root


@pytest.fixture(scope="session")
def tiny2d(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny2d")
    build_tiny_dataset(root, dims=2, num_cases=6)
    return root


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """The test machine is shared (load far above its 2 cores): OpenMP threads spinning against each other
    make a tiny step 20x slower than one thread does. Training tests therefore use one thread."""
    import torch

    import autoseg.training.trainer as trainer

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(trainer, "configure_threads", lambda num_threads=None: 1)
    yield
    torch.set_num_threads(previous)
