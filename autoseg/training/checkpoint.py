"""Checkpoints: state dicts and JSON-able metadata only, written atomically, read with ``weights_only=True``.

Format (docs/internals.md, "Training")::

    {"format": "autoseg-checkpoint", "format_version": 1,
     "network": state_dict, "optimizer": state_dict | None, "scheduler": dict | None,
     "rng": {"torch": uint8 tensor, "numpy": {...tensors...}, "python": {...tensors...}, "cuda": [...]},
     "metadata": {"dataset_name", "configuration", "plans", "fold", "epoch", "architecture",
                  "in_channels", "num_classes", "selfreg", "curves", ...}}

``torch.load(..., weights_only=True)`` refuses anything but tensors and plain containers, so RNG states are
stored as tensors and everything else as JSON-able values: loading a checkpoint never executes code.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.errors import CheckpointError
from autoseg.fileio import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "autoseg-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
REQUIRED_KEYS = ("network", "metadata")
REQUIRED_METADATA = ("configuration", "architecture", "in_channels", "num_classes")

LATEST = "checkpoint_latest.pt"
BEST = "checkpoint_best.pt"
FINAL = "checkpoint_final.pt"


def make_checkpoint(
    network_state: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    scheduler_state: dict[str, Any] | None = None,
    rng_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the checkpoint dict. Tensors are moved to CPU so a checkpoint loads on any machine."""
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "network": {k: v.detach().cpu() for k, v in network_state.items()},
        "optimizer": _to_cpu(optimizer_state) if optimizer_state is not None else None,
        "scheduler": scheduler_state,
        "rng": rng_state if rng_state is not None else {},
        "metadata": metadata,
    }


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` atomically: a full disk or a kill leaves the previous file intact, never a
    truncated one (the temporary file is removed and the error propagates)."""
    path = Path(path)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(checkpoint, tmp)
    log.debug("wrote %s", path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate an autoseg checkpoint with ``weights_only=True``.

    Raises CheckpointError (one line: file, expected, found, fix) when the file is missing, truncated,
    not a torch file, from another program (e.g. an nnU-Net ``.pth``) or of a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: checkpoint not found; train this fold first (`autoseg train`) or pass an existing file"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, pickled classes refused by weights_only, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: expected an autoseg checkpoint readable with torch.load(weights_only=True), but it is "
            f"corrupted or foreign ({reason[:200]}); delete it and resume from another checkpoint or retrain"
        ) from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format", "no 'format' key") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path}: expected format '{CHECKPOINT_FORMAT}', found {found!r}; this file was not written by "
            "autoseg (nnU-Net checkpoints cannot be loaded directly); retrain with `autoseg train`"
        )
    version = checkpoint.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is newer than this autoseg supports "
            f"({CHECKPOINT_FORMAT_VERSION}); upgrade autoseg"
        )
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    metadata = checkpoint.get("metadata")
    if not missing and isinstance(metadata, dict):
        missing = [f"metadata.{k}" for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise CheckpointError(
            f"{path}: autoseg checkpoint lacks {', '.join(missing)}; the file is incomplete, retrain this fold"
        )
    return checkpoint


# ------------------------------------------------------------------------------------------- RNG states
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
