"""Training's own part of a checkpoint: the random states a --continue restores.

The file format, ``save_checkpoint``/``load_checkpoint`` and the metadata are the contract in
:mod:`autoseg.contracts.checkpoint` (inference and export read checkpoints too); what the ``"rng"`` entry holds
is written and read only by training, so it lives here.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """torch, numpy (legacy global) and python ``random`` states, as tensors and ints (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, _ = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; missing parts are left as they are."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if "numpy" in state:
        numpy_state = state["numpy"]
        keys = numpy_state["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state(
            ("MT19937", keys, int(numpy_state["pos"]), int(numpy_state["has_gauss"]),
             float(numpy_state["cached_gaussian"]))
        )
    if "python" in state:
        python_state = state["python"]
        random.setstate((int(python_state["version"]), tuple(int(v) for v in python_state["state"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
