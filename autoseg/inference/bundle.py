"""The model bundle: one zip that carries a trained model to another machine, and nothing that can run code.

Members (a flat zip, no folders)::

    manifest.json            BundleManifest: format, schema version, autoseg version, folds, SHA-256 of every
                             other member
    plans.json               the plans the folds were trained with (preprocessing: spacing, normalisation, ...)
    configuration.json       the configuration of those plans the folds belong to, as stored in the checkpoints
    fold_<k>.safetensors     each fold's network weights (safetensors: a JSON header and raw tensor bytes)
    dataset.json             the raw dataset's description, when the data root still had it
    postprocessing.json      the rules `autoseg find-best` chose for this model, when it chose some
    previous_configuration.json, previous_fold_<k>.safetensors
                             cascades only: the stage predicted first (3d_lowres), all of its folds

Why this shape: checkpoints are ``torch.save`` files, which are pickles. ``weights_only=True`` makes loading
them safe in current torch, but a file a stranger sends should not depend on the reader's torch version
being careful. safetensors and JSON are data formats with no way to name a function, so opening a bundle
can only ever produce tensors and dicts. The loader reads every member into memory (nothing is extracted to
disk), refuses names that could escape a folder if someone did extract it (``..``, absolute paths,
backslashes), refuses every member it does not know (a ``.pt`` or ``.pkl`` among them), and checks each
member against the manifest's SHA-256 before using it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autoseg.contracts.plans import Configuration, Plans
from autoseg.errors import CheckpointError
from autoseg.fileio import atomic_path

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "autoseg-bundle"
BUNDLE_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PLANS = "plans.json"
CONFIGURATION = "configuration.json"
DATASET = "dataset.json"
POSTPROCESSING = "postprocessing.json"
PREVIOUS_PREFIX = "previous_"
PREVIOUS_CONFIGURATION = PREVIOUS_PREFIX + CONFIGURATION
_JSON_MEMBERS = (PLANS, CONFIGURATION, DATASET, POSTPROCESSING, PREVIOUS_CONFIGURATION)
_REQUIRED_MEMBERS = (PLANS, CONFIGURATION)
_FOLD_MEMBER = re.compile(r"^(previous_)?fold_(\d+|all)\.safetensors$")
# Every member is read into memory, so a hostile zip must not be able to ask for unbounded memory: JSON
# files are kilobytes, and the largest published nnU-Net-style networks are a few hundred MB per fold.
MAX_JSON_BYTES = 64 * 2**20
MAX_WEIGHTS_BYTES = 8 * 2**30
# a fixed timestamp makes the same model export to the same bytes (the zip format stores one per member)
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass
class BundleFold:
    """One fold in the manifest: its number (or "all"), the weights member, and where it came from."""

    fold: int | str
    weights: str
    epoch: int | None = None
    checkpoint: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"fold": self.fold, "weights": self.weights, "epoch": self.epoch, "checkpoint": self.checkpoint}


@dataclass
class BundleStage:
    """The stage a cascade predicts first (its configuration, network size and folds), in the manifest."""

    configuration: str
    architecture: str
    in_channels: int
    num_classes: int
    folds: list[BundleFold]

    def to_json(self) -> dict[str, Any]:
        return {"configuration": self.configuration, "architecture": self.architecture,
                "in_channels": self.in_channels, "num_classes": self.num_classes,
                "folds": [fold.to_json() for fold in self.folds]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BundleStage":
        return cls(configuration=str(data["configuration"]), architecture=str(data["architecture"]),
                   in_channels=int(data["in_channels"]), num_classes=int(data["num_classes"]),
                   folds=[_fold_from_json(f) for f in data["folds"]])


def _fold_from_json(data: dict[str, Any]) -> BundleFold:
    return BundleFold(fold=data["fold"], weights=str(data["weights"]), epoch=data.get("epoch"),
                      checkpoint=str(data.get("checkpoint", "")))


@dataclass
class BundleManifest:
    """``manifest.json``: what the bundle holds and the SHA-256 (hex) of every other member.
    ``previous_stage``: cascades only, the stage whose segmentation becomes extra input channels."""

    dataset_name: str
    configuration: str
    architecture: str
    in_channels: int
    num_classes: int
    folds: list[BundleFold]
    checksums: dict[str, str]
    autoseg_version: str
    previous_stage: BundleStage | None = None
    format: str = BUNDLE_FORMAT
    schema_version: int = BUNDLE_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "schema_version": self.schema_version,
            "autoseg_version": self.autoseg_version,
            "dataset_name": self.dataset_name,
            "configuration": self.configuration,
            "architecture": self.architecture,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "folds": [fold.to_json() for fold in self.folds],
            "previous_stage": self.previous_stage.to_json() if self.previous_stage is not None else None,
            "checksums": dict(sorted(self.checksums.items())),
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> "BundleManifest":
        if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(
                f"{source}: manifest.json has format {found!r}, expected '{BUNDLE_FORMAT}'; this zip was not "
                "written by `autoseg export`"
            )
        version = data.get("schema_version")
        if not isinstance(version, int) or version < 1:
            raise CheckpointError(f"{source}: manifest.json has schema_version {version!r}, expected a positive "
                                  "integer; export the model again with `autoseg export`")
        if version > BUNDLE_SCHEMA_VERSION:
            raise CheckpointError(
                f"{source}: bundle schema version {version} (autoseg {data.get('autoseg_version', '?')}) is newer "
                f"than this autoseg reads ({BUNDLE_SCHEMA_VERSION}); upgrade autoseg (pip install -U autoseg)"
            )
        try:
            folds = [_fold_from_json(f) for f in data["folds"]]
            previous = data.get("previous_stage")
            checksums = {str(k): str(v) for k, v in data["checksums"].items()}
            return cls(
                dataset_name=str(data["dataset_name"]), configuration=str(data["configuration"]),
                architecture=str(data["architecture"]), in_channels=int(data["in_channels"]),
                num_classes=int(data["num_classes"]), folds=folds, checksums=checksums,
                autoseg_version=str(data.get("autoseg_version", "")), schema_version=version,
                previous_stage=BundleStage.from_json(previous) if previous is not None else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"{source}: manifest.json is malformed ({exc!r}); export the model again with `autoseg export`"
            ) from exc


@dataclass
class Bundle:
    """A validated bundle, read into memory: the manifest, the plans and configuration, the weights of each
    fold (CPU tensors, in manifest order) and the optional JSON members as plain dicts."""

    path: Path
    manifest: BundleManifest
    plans: Plans
    configuration: Configuration
    weights: list[tuple[BundleFold, dict[str, torch.Tensor]]] = field(default_factory=list)
    dataset: dict[str, Any] | None = None
    postprocessing: dict[str, Any] | None = None
    previous_configuration: Configuration | None = None
    previous_weights: list[tuple[BundleFold, dict[str, torch.Tensor]]] = field(default_factory=list)


@dataclass
class PreviousStage:
    """What :func:`write_bundle` needs of a cascade's first stage."""

    stage: BundleStage
    configuration_json: dict[str, Any]
    weights: list[tuple[BundleFold, dict[str, torch.Tensor]]]


# ------------------------------------------------------------------------------------------------ writing
def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes. Tensors are copied to contiguous CPU memory of their own, because
    safetensors refuses tensors that share storage (tied weights, views). The fold is named by the member and
    the manifest, not in the header's metadata: safetensors writes metadata in hash-map order, and one key
    is the only order that makes the same weights give the same bytes."""
    tensors = {name: value.detach().cpu().clone(memory_format=torch.contiguous_format)
               for name, value in state_dict.items()}
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt"})


def write_bundle(
    path: str | os.PathLike,
    manifest: BundleManifest,
    plans: Plans,
    configuration_json: dict[str, Any],
    weights: list[tuple[BundleFold, dict[str, torch.Tensor]]],
    dataset_json: dict[str, Any] | None = None,
    postprocessing_json: dict[str, Any] | None = None,
    previous: PreviousStage | None = None,
) -> Path:
    """Write a bundle atomically and read it back through :func:`read_bundle` before it replaces ``path``:
    a bundle that exists is one that loads. ``manifest.folds`` and ``manifest.checksums`` are filled here."""
    members: dict[str, bytes] = {PLANS: _json_bytes(plans.to_json()), CONFIGURATION: _json_bytes(configuration_json)}
    if dataset_json is not None:
        members[DATASET] = _json_bytes(dataset_json)
    if postprocessing_json is not None:
        members[POSTPROCESSING] = _json_bytes(postprocessing_json)
    manifest.folds = []
    for fold, state_dict in weights:
        fold.weights = f"fold_{fold.fold}.safetensors"
        members[fold.weights] = weights_bytes(state_dict)
        manifest.folds.append(fold)
    manifest.previous_stage = None
    if previous is not None:
        members[PREVIOUS_CONFIGURATION] = _json_bytes(previous.configuration_json)
        previous.stage.folds = []
        for fold, state_dict in previous.weights:
            fold.weights = f"{PREVIOUS_PREFIX}fold_{fold.fold}.safetensors"
            members[fold.weights] = weights_bytes(state_dict)
            previous.stage.folds.append(fold)
        manifest.previous_stage = previous.stage
    manifest.checksums = {name: sha256(data) for name, data in members.items()}
    target = Path(path)
    with atomic_path(target, suffix=".zip", verify=lambda tmp: read_bundle(tmp)) as tmp:
        with zipfile.ZipFile(tmp, "w") as archive:
            for name, data in [(MANIFEST, _json_bytes(manifest.to_json())), *sorted(members.items())]:
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                # float weights hardly compress; JSON does
                info.compress_type = zipfile.ZIP_STORED if name.endswith(".safetensors") else zipfile.ZIP_DEFLATED
                archive.writestr(info, data)
    log.debug("wrote %s (%d fold(s), %.1f MB)", target, len(manifest.folds), target.stat().st_size / 2**20)
    return target


# ------------------------------------------------------------------------------------------------ reading
def unsafe_member_name(name: str) -> str | None:
    """Why ``name`` could escape the folder it is extracted into (zip-slip), or None when it cannot."""
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in name:
        return "contains '..'"
    if "\x00" in name:
        return "contains a NUL character"
    return None


def _expected_member(name: str) -> bool:
    return name == MANIFEST or name in _JSON_MEMBERS or bool(_FOLD_MEMBER.match(name))


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, source: str) -> bytes:
    """The member's bytes, refusing more than ``limit`` whatever the zip header claims (a zip bomb)."""
    if info.file_size > limit:
        raise CheckpointError(f"{source}: member {info.filename} is {info.file_size} bytes, more than the "
                              f"{limit} a bundle member may have; this is not a bundle `autoseg export` wrote")
    try:
        with archive.open(info) as handle:
            data = handle.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:  # bad CRC, truncated, encrypted
        raise CheckpointError(f"{source}: member {info.filename} cannot be read ({exc}); the file is corrupted, "
                              "copy or export it again") from exc
    if len(data) > limit:
        raise CheckpointError(f"{source}: member {info.filename} unpacks to more than {limit} bytes; "
                              "this is not a bundle `autoseg export` wrote")
    return data


def _parse_json(data: bytes, name: str, source: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{source}: member {name} is not valid JSON ({exc}); export the model again") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{source}: member {name} holds a JSON {type(value).__name__}, expected an object; "
                              "export the model again")
    return value


def _looks_pickled(data: bytes) -> bool:
    # pickle protocol 2+ opens with PROTO (0x80) and the protocol number; torch.save writes a zip (PK)
    return (len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5) or data[:4] == b"PK\x03\x04"


def _parse_weights(data: bytes, name: str, source: str) -> dict[str, torch.Tensor]:
    if _looks_pickled(data):
        raise CheckpointError(
            f"{source}: member {name} is a pickle (torch.save) file, expected safetensors; bundles never hold "
            "pickles because loading one can run code. Export the model again with `autoseg export`"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: member {name} is not a valid safetensors file ({exc}); export the "
                              "model again") from exc


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Open and validate a bundle; raise :class:`CheckpointError` (one line) on anything unexpected.

    Refused: a file that is not a zip; a member name with ``..``, an absolute path or a backslash; a folder,
    link or encrypted member; any member name outside the layout (module docstring), pickles included; a
    missing manifest, plans or configuration; a manifest of another format or a newer schema; a member whose
    SHA-256 differs from the manifest's, or a member the manifest does not list (or lists but is missing);
    weights that are not safetensors.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model bundle not found; pass the .zip `autoseg export` wrote")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: expected a model bundle (.zip from `autoseg export`), found a file that "
                              f"is not a zip ({exc}); export the model again") from exc
    with archive:
        infos: dict[str, zipfile.ZipInfo] = {}
        for info in archive.infolist():
            name = info.filename
            reason = unsafe_member_name(name)
            if reason:
                raise CheckpointError(f"{source}: member name {name!r} {reason} (it could write outside the folder "
                                      "it is unpacked into); refusing this bundle, get it from a trusted source")
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip tool stored no file type
            if info.is_dir() or (kind and kind != stat.S_IFREG):
                raise CheckpointError(f"{source}: member {name!r} is a folder or link, expected plain files only; "
                                      "this is not a bundle `autoseg export` wrote")
            if info.flag_bits & 0x1:
                raise CheckpointError(f"{source}: member {name!r} is encrypted; bundles are not, export it again")
            if not _expected_member(name):
                hint = " (a pickle: bundles hold safetensors weights only)" if re.search(
                    r"\.(pt|pth|pkl|pickle|ckpt|bin|npy|npz)$", name) else ""
                raise CheckpointError(
                    f"{source}: unexpected member {name!r}{hint}; a bundle holds only {MANIFEST}, "
                    f"{', '.join(_JSON_MEMBERS)} and (previous_)fold_<k>.safetensors. Export the model again"
                )
            if name in infos:
                raise CheckpointError(f"{source}: member {name!r} appears twice; export the model again")
            infos[name] = info
        if MANIFEST not in infos:
            raise CheckpointError(f"{source}: no {MANIFEST} in the zip; expected a bundle written by `autoseg "
                                  "export` (a zipped results folder is not one), export the model again")
        manifest = BundleManifest.from_json(
            _parse_json(_read_member(archive, infos[MANIFEST], MAX_JSON_BYTES, source), MANIFEST, source), source)
        listed, present = set(manifest.checksums), set(infos) - {MANIFEST}
        if present - listed:
            raise CheckpointError(f"{source}: member(s) {', '.join(sorted(present - listed))} not listed in the "
                                  "manifest's checksums; the bundle was modified, export it again")
        if listed - present:
            raise CheckpointError(f"{source}: member(s) {', '.join(sorted(listed - present))} listed in the "
                                  "manifest are missing; the bundle is incomplete, copy or export it again")
        for required in _REQUIRED_MEMBERS:
            if required not in present:
                raise CheckpointError(f"{source}: no {required} in the bundle; export the model again")
        if not manifest.folds:
            raise CheckpointError(f"{source}: the manifest lists no folds; export a trained model again")

        def verified(name: str, limit: int) -> bytes:
            data = _read_member(archive, infos[name], limit, source)
            digest = sha256(data)
            if digest != manifest.checksums[name]:
                raise CheckpointError(
                    f"{source}: member {name} has SHA-256 {digest[:16]}..., the manifest says "
                    f"{manifest.checksums[name][:16]}...; the file is corrupted or was modified, copy or export it again"
                )
            return data

        documents = {name: _parse_json(verified(name, MAX_JSON_BYTES), name, source)
                     for name in _JSON_MEMBERS if name in present}
        try:
            plans = Plans.from_json(documents[PLANS])
            configuration = Configuration.from_json(documents[CONFIGURATION])
            previous_configuration = (Configuration.from_json(documents[PREVIOUS_CONFIGURATION])
                                      if PREVIOUS_CONFIGURATION in documents else None)
        except Exception as exc:  # noqa: BLE001 - any malformed plan is the same user problem
            raise CheckpointError(f"{source}: plans.json/configuration.json cannot be read ({str(exc)[:200]}); "
                                  "export the model again with this autoseg version") from exc
        stage = manifest.previous_stage
        wanted = configuration.previous_stage
        if (stage is None) != (wanted is None) or (previous_configuration is None) != (stage is None) or (
            stage is not None and previous_configuration is not None
            and not stage.configuration == previous_configuration.name == wanted
        ):
            raise CheckpointError(
                f"{source}: configuration '{configuration.name}' needs previous stage {wanted!r}, the bundle holds "
                f"{stage.configuration if stage else None!r}; export the model again"
            )

        def load_weights(folds: list[BundleFold], previous: bool) -> list[tuple[BundleFold, dict[str, torch.Tensor]]]:
            loaded = []
            for fold in folds:
                if (fold.weights not in present or not _FOLD_MEMBER.match(fold.weights)
                        or fold.weights.startswith(PREVIOUS_PREFIX) != previous):
                    raise CheckpointError(f"{source}: the manifest names weights {fold.weights!r} for fold "
                                          f"{fold.fold}, which the bundle does not hold; export the model again")
                loaded.append((fold, _parse_weights(verified(fold.weights, MAX_WEIGHTS_BYTES), fold.weights,
                                                    source)))
            return loaded

        if stage is not None and not stage.folds:
            raise CheckpointError(f"{source}: the previous stage lists no folds; export the model again")
        weights = load_weights(manifest.folds, previous=False)
        previous_weights = load_weights(stage.folds, previous=True) if stage is not None else []
    return Bundle(path=path, manifest=manifest, plans=plans, configuration=configuration, weights=weights,
                  dataset=documents.get(DATASET), postprocessing=documents.get(POSTPROCESSING),
                  previous_configuration=previous_configuration, previous_weights=previous_weights)
