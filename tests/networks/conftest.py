"""Fixtures for the network tests."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_single_thread() -> Iterator[None]:
    # the tests use tiny tensors: one intra-op thread avoids oversubscription when other suites share the
    # cores (3x faster on the 2-core CI machine under load); restored so other packages' tests are unaffected
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
