"""checkpoint_*.pt: state dicts and JSON-able metadata only, written atomically, read with ``weights_only=True``.

The contract between training (writes) and inference, export and --continue (read). Format
(docs/internals.md, "Training")::

    {"format": "autoseg-checkpoint", "format_version": 1,
     "network": state_dict, "optimizer": state_dict | None, "scheduler": dict | None,
     "rng": {"torch": uint8 tensor, "numpy": {...tensors...}, "python": {...tensors...}, "cuda": [...]},
     "metadata": CheckpointMetadata.to_json()}

``torch.load(..., weights_only=True)`` refuses anything but tensors and plain containers, so RNG states are
stored as tensors (``autoseg.training.checkpoint`` captures them) and everything else as JSON-able values:
loading a checkpoint never executes code.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from autoseg.contracts.plans import Configuration, Plans
from autoseg.errors import CheckpointError
from autoseg.fileio import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "autoseg-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
REQUIRED_KEYS = ("network", "metadata")
REQUIRED_METADATA = ("configuration", "architecture", "in_channels", "num_classes")
# Bump when a metadata field changes meaning or a required one is added; from_json keeps reading older ones.
# Checkpoints written before the field existed carry none and are version 1.
CHECKPOINT_METADATA_SCHEMA_VERSION = 1

LATEST = "checkpoint_latest.pt"
BEST = "checkpoint_best.pt"
FINAL = "checkpoint_final.pt"


@dataclass
class CheckpointMetadata:
    """What a checkpoint says about itself, besides the weights (the ``"metadata"`` entry, JSON-able).

    ``configuration`` and ``plans`` are kept as their JSON form (``asdict(Configuration)``, ``Plans.to_json()``):
    the bundle ships the configuration exactly as training stored it, and a reader that needs only the run's
    options (``--continue``) should not fail on a plan it does not use. :meth:`parsed_configuration` and
    :meth:`parsed_plans` turn them into the dataclasses. The training state fields (``epoch`` onwards) default
    to what a fresh run starts with, so checkpoints that lack them (tests' fixtures, older runs) still load.
    """

    configuration: dict[str, Any]
    architecture: str
    in_channels: int  # network input channels (image channels, plus the previous stage's classes for a cascade)
    num_classes: int
    dataset_name: str | None = None
    plans: dict[str, Any] | None = None
    fold: int | str | None = None
    epoch: int | None = None  # completed epochs (None: not recorded; a resume starts at 0)
    selfreg: bool | None = None  # None: not recorded (a checkpoint from before the option)
    curves: dict[str, Any] = field(default_factory=dict)  # autoseg.training.progress.Curves.to_json()
    ema_pseudo_dice: float | None = None
    best_ema_pseudo_dice: float = -1.0
    elapsed_s: float = 0.0  # wall-clock training time across runs (the --time-budget clock)
    seconds_per_patch: float | None = None
    seed: int | None = None
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    time_budget_s: float | None = None
    iterations_done: int = 0
    budget_choice: dict[str, Any] | None = None  # autoseg.training.budget.BudgetChoice.to_json()
    budget_reasons: list[str] = field(default_factory=list)
    epoch_iteration: int = 0  # iterations of epoch ``epoch`` done when saved mid-epoch
    epoch_losses: list[float] = field(default_factory=list)
    schema_version: int = CHECKPOINT_METADATA_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, source: str | os.PathLike = "checkpoint") -> "CheckpointMetadata":
        """The metadata of a checkpoint at ``source`` (named in errors). Raises CheckpointError (one line) for
        a newer schema, unknown or missing required fields, or values of the wrong type."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: checkpoint metadata is a {type(data).__name__}, expected a dict; "
                                  "retrain this fold")
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or version > CHECKPOINT_METADATA_SCHEMA_VERSION:
            raise CheckpointError(
                f"{source}: checkpoint metadata schema version {version!r} is newer than this autoseg supports "
                f"({CHECKPOINT_METADATA_SCHEMA_VERSION}); upgrade autoseg"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(
                f"{source}: checkpoint metadata has unknown field(s) {', '.join(unknown)} for schema version "
                f"{version}; it was written by another autoseg, upgrade autoseg or retrain this fold"
            )
        missing = [f"metadata.{k}" for k in REQUIRED_METADATA if k not in data]
        if missing:
            raise CheckpointError(
                f"{source}: autoseg checkpoint lacks {', '.join(missing)}; the file is incomplete, retrain this fold"
            )
        try:
            metadata = cls(**data)
            metadata.in_channels, metadata.num_classes = int(metadata.in_channels), int(metadata.num_classes)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: unreadable checkpoint metadata ({exc}); retrain this fold") from exc
        if not isinstance(metadata.configuration, dict):
            raise CheckpointError(f"{source}: checkpoint metadata's configuration is a "
                                  f"{type(metadata.configuration).__name__}, expected a dict; retrain this fold")
        return metadata

    def parsed_configuration(self) -> Configuration:
        """The configuration the network was built from (KeyError/TypeError/ValueError when malformed)."""
        return Configuration.from_json(self.configuration)

    def parsed_plans(self) -> Plans:
        """The plans the fold was trained with (KeyError when the checkpoint has none)."""
        if self.plans is None:
            raise KeyError("plans")
        return Plans.from_json(self.plans)


def make_checkpoint(
    network_state: dict[str, torch.Tensor],
    metadata: CheckpointMetadata,
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
        "metadata": metadata.to_json(),
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
    """Load and validate an autoseg checkpoint with ``weights_only=True``. The ``"metadata"`` entry stays the
    JSON form it is on disk; ``CheckpointMetadata.from_json(checkpoint["metadata"], path)`` reads it.

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
    if missing:
        raise CheckpointError(
            f"{path}: autoseg checkpoint lacks {', '.join(missing)}; the file is incomplete, retrain this fold"
        )
    CheckpointMetadata.from_json(checkpoint["metadata"], path)  # refuses missing fields and newer schemas
    return checkpoint
