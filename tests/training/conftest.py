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
