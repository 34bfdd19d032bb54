"""`autoseg export`: take a trained model to another machine.

Two formats:

- ``bundle`` (default): one zip with every fold's weights (safetensors), the plans, configuration,
  dataset.json and postprocessing.json, checked by SHA-256 (:mod:`autoseg.inference.bundle`).
  ``autoseg predict -m model.zip`` and ``Predictor.from_bundle`` run it with the full autoseg pipeline.
- ``onnx``: per fold ``fold_<k>.onnx`` (the network alone: image patches in, full-resolution logits out,
  any batch size) and ``preprocessing.json`` beside them, which states everything around the network a
  runtime without autoseg must re-implement: normalisation, target spacing, patch size, sliding-window
  step, Gaussian weighting, mirroring, fold averaging and the way back to the original grid.

No TorchScript: a TorchScript archive is code plus pickled constants (the opposite of what a model file
may hold here) and ``torch.jit`` is in maintenance in torch 2.x; ONNX covers the runtimes people deploy to.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from autoseg import __version__
from autoseg.contracts.checkpoint import CheckpointMetadata, load_checkpoint
from autoseg.contracts.plans import Configuration, Plans
from autoseg.errors import CheckpointError, ConfigurationError
from autoseg.fileio import atomic_path, read_json, write_json
from autoseg.inference.bundle import BundleFold, BundleManifest, BundleStage, PreviousStage, write_bundle
from autoseg.inference.predictor import (
    DEFAULT_CHECKPOINT,
    ModelIdentity,
    _fold_of,
    build_network,
    find_fold_checkpoints,
    model_folder,
)
from autoseg.inference.sliding_window import mirror_axis_sets

log = logging.getLogger(__name__)

FORMATS = ("bundle", "onnx")
ONNX_PREPROCESSING_FORMAT = "autoseg-onnx-preprocessing"
ONNX_PREPROCESSING_SCHEMA_VERSION = 1
ONNX_INPUT, ONNX_OUTPUT = "image", "logits"
# Parity that export checks (and tests/inference/test_onnx.py asserts): ONNX Runtime and torch differ by
# float32 rounding in the order of operations, ~1e-6 of the logit range on the architectures that export;
# 1e-3 leaves room for bigger networks while still catching a wrong operator (which is off by O(1)).
ONNX_TOLERANCE = 1e-3


@dataclass
class TrainedFold:
    fold: int | str
    checkpoint: Path
    state_dict: dict[str, torch.Tensor]
    epoch: int | None


@dataclass
class TrainedModel:
    """The folds of one configuration as found in the results folder, checked to belong together."""

    folder: Path
    dataset_name: str
    plans: Plans
    configuration: Configuration
    configuration_json: dict[str, Any]
    in_channels: int
    num_classes: int
    folds: list[TrainedFold]
    raw_folder: Path
    previous: "TrainedModel | None" = None  # cascades: the stage predicted first, all of its trained folds


def load_trained_model(
    dataset: str | int,
    configuration: str,
    folds: Sequence[int | str] | None = None,
    root: str | os.PathLike | None = None,
    architecture: str | None = None,
    checkpoint: str = DEFAULT_CHECKPOINT,
) -> TrainedModel:
    """Read the chosen folds' checkpoints (``weights_only``) and check they are one model: same
    configuration, architecture, channels, classes and patch, as an ensemble needs."""
    from autoseg.paths import resolve_dataset

    location = resolve_dataset(dataset, root)
    folder = model_folder(dataset, configuration, root=root, architecture=architecture)
    if folds is not None:
        folds = [int(f) if str(f).isdigit() else str(f) for f in folds]
    paths = find_fold_checkpoints(folder, folds, checkpoint)
    trained: list[TrainedFold] = []
    reference: ModelIdentity | None = None
    first: CheckpointMetadata | None = None
    for path in paths:
        checkpoint_dict = load_checkpoint(path, map_location="cpu")
        meta = CheckpointMetadata.from_json(checkpoint_dict["metadata"], path)
        try:
            model = ModelIdentity.of(meta.parsed_configuration(), meta)
            meta.parsed_plans()
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: checkpoint metadata lacks a readable configuration/plans ({exc}); "
                                  "retrain this fold") from exc
        if reference is None:
            reference, first = model, meta
        elif model != reference:
            raise CheckpointError(
                f"{path}: belongs to {model.describe()}, but {paths[0]} is {reference.describe_short()}; export "
                "folds of one configuration only"
            )
        # only the weights are kept: the optimiser state is as large again and has no use outside training
        trained.append(TrainedFold(_fold_of(path), path, checkpoint_dict["network"],
                                   int(meta.epoch) if meta.epoch is not None else None))
        del checkpoint_dict
    assert first is not None  # find_fold_checkpoints returns at least one path or raises
    plans = first.parsed_plans()
    this_configuration = first.parsed_configuration()
    previous = None
    if this_configuration.previous_stage:
        # as Predictor.from_folder predicts a cascade: every trained fold of the previous stage, its plan's arch
        previous = load_trained_model(dataset, this_configuration.previous_stage, folds=None, root=root,
                                      checkpoint=checkpoint)
    return TrainedModel(
        folder=folder, dataset_name=location.name, plans=plans, configuration=this_configuration,
        configuration_json=dict(first.configuration), in_channels=first.in_channels,
        num_classes=first.num_classes, folds=trained, raw_folder=location.raw, previous=previous,
    )


# -------------------------------------------------------------------------------------------------- bundle
def export_bundle(model: TrainedModel, output: str | os.PathLike) -> Path:
    """Write ``model`` as one zip (:mod:`autoseg.inference.bundle`); returns the file."""
    output = Path(output)
    if output.suffix != ".zip":
        raise ConfigurationError(f"{output}: a model bundle is a zip file; name it like model.zip")
    dataset_json = None
    dataset_file = model.raw_folder / "dataset.json"
    if dataset_file.is_file():
        dataset_json = read_json(dataset_file)
    else:
        log.warning("%s not found: the bundle goes without dataset.json (plans.json has the labels and channels)",
                    dataset_file)
    postprocessing_json = None
    postprocessing_file = model.folder / "postprocessing.json"
    if postprocessing_file.is_file():
        from autoseg.contracts.postprocessing import load_postprocessing

        postprocessing_json = load_postprocessing(postprocessing_file).to_json()  # validated before it ships
    manifest = BundleManifest(
        dataset_name=model.dataset_name, configuration=model.configuration.name,
        architecture=model.configuration.architecture.name, in_channels=model.in_channels,
        num_classes=model.num_classes, folds=[], checksums={}, autoseg_version=__version__,
    )
    previous = None
    if model.previous is not None:
        stage = model.previous
        previous = PreviousStage(
            stage=BundleStage(configuration=stage.configuration.name, architecture=stage.configuration.architecture.name,
                              in_channels=stage.in_channels, num_classes=stage.num_classes, folds=[]),
            configuration_json=stage.configuration_json, weights=_bundle_weights(stage),
        )
    return write_bundle(output, manifest, model.plans, model.configuration_json, _bundle_weights(model),
                        dataset_json, postprocessing_json, previous)


def _bundle_weights(model: TrainedModel) -> list[tuple[BundleFold, dict[str, torch.Tensor]]]:
    return [(BundleFold(fold=f.fold, weights="", epoch=f.epoch, checkpoint=f.checkpoint.name), f.state_dict)
            for f in model.folds]


# ---------------------------------------------------------------------------------------------------- ONNX
class LogitsOnly(nn.Module):
    """The network with one output: the full-resolution logits (a deep-supervision list gives its first,
    highest-resolution entry, as the sliding window takes it)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        output = self.network(image)
        return output[0] if isinstance(output, (list, tuple)) else output


def _exporter_reason(exc: BaseException) -> str:
    """The line of the exporter's (long, multi-section) error that names what failed."""
    text = str(exc)
    match = re.search(r"## Exception summary\s*\n\s*\n?(.+)", text)
    line = match.group(1) if match else (text.strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"\x1b\[[0-9;]*m", "", line).strip()[:300]


def onnx_parity(path: Path, network: nn.Module, example: torch.Tensor) -> tuple[float, float]:
    """``(max |ONNX Runtime - torch| / logit range, argmax agreement)`` on ``example`` (CPU, float32)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run([ONNX_OUTPUT], {ONNX_INPUT: example.numpy()})[0]
    with torch.inference_mode():
        torch_logits = network(example).float().numpy()
    scale = max(float(torch_logits.max() - torch_logits.min()), 1e-6)
    difference = float(np.abs(onnx_logits - torch_logits).max()) / scale
    agreement = float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean())
    return difference, agreement


def export_network_onnx(network: nn.Module, in_channels: int, patch_size: Sequence[int], target: Path,
                        name: str) -> tuple[float | None, int]:
    """Export one network (eval, CPU) to ``target`` atomically; ``(relative deviation, opset)``. The batch axis
    is dynamic, the spatial axes are the patch (the sliding window never feeds anything else, and fixed-size
    networks accept nothing else). When ONNX Runtime is installed the written file is run on a batch of a
    different size than the one traced and must match torch within :data:`ONNX_TOLERANCE`."""
    try:
        import onnx  # noqa: F401  - the exporter needs onnx and onnxscript
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            f"ONNX export needs the onnx and onnxscript packages ({exc.name} is missing); "
            "pip install 'autoseg[onnx]'"
        ) from exc
    wrapped = LogitsOnly(network).eval().cpu()
    # batch 2, not 1: torch.export specialises sizes 0 and 1, which would pin the batch axis
    example = torch.randn(2, in_channels, *patch_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch")
    # torch's exporter warns once per torchvision operator it cannot register when torchvision is absent;
    # autoseg's networks use none of them, so the user would read four irrelevant warnings per export
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous_level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        return _export_checked(wrapped, example, batch, in_channels, patch_size, target, name)
    finally:
        registration_log.setLevel(previous_level)


def _export_checked(wrapped: nn.Module, example: torch.Tensor, batch: Any, in_channels: int,
                    patch_size: Sequence[int], target: Path, name: str) -> tuple[float | None, int]:
    with atomic_path(target, suffix=".onnx") as tmp:
        try:
            with warnings.catch_warnings():
                # torch.export's own use of a pytree API it deprecated (torch 2.13): not ours to act on
                warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
                torch.onnx.export(
                    wrapped, (example,), str(tmp), dynamo=True, external_data=False, input_names=[ONNX_INPUT],
                    output_names=[ONNX_OUTPUT], dynamic_shapes={"image": {0: batch}}, verbose=False,
                )
        except Exception as exc:  # noqa: BLE001 - every exporter failure is the same user-facing problem
            raise ConfigurationError(
                f"{target}: torch.onnx.export cannot convert architecture '{name}' ({_exporter_reason(exc)}); "
                "ship it as a bundle instead (autoseg export without --format, docs/prediction.md)"
            ) from exc
        # checked before the file takes its name: an ONNX file that exists is one that computes the network
        import onnx

        model = onnx.load(str(tmp))
        onnx.checker.check_model(model)
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            log.warning("onnxruntime not installed: %s not checked against torch (pip install 'autoseg[onnx]')",
                        target)
            return None, opset
        check = torch.randn(3, in_channels, *patch_size, generator=torch.Generator().manual_seed(1))
        difference, agreement = onnx_parity(tmp, wrapped, check)
        if difference > ONNX_TOLERANCE:
            raise ConfigurationError(
                f"{target}: ONNX Runtime logits differ from torch by {difference:.2e} of their range (argmax "
                f"agreement {agreement:.4f}, tolerance {ONNX_TOLERANCE}); the exporter mistranslated "
                f"'{name}', ship it as a bundle instead"
            )
    return difference, opset


def preprocessing_description(plans: Plans, configuration: Configuration, fold_files: list[dict[str, Any]],
                              opset: int) -> dict[str, Any]:
    """What ``preprocessing.json`` says: every step around the ONNX network, with the numbers of this model
    (docs/prediction.md, "ONNX")."""
    dims = int(configuration.dims)
    normalization = []
    for channel, scheme in enumerate(configuration.normalization):
        entry: dict[str, Any] = {
            "channel": channel,
            "name": plans.channel_names.get(str(channel), ""),
            "scheme": scheme,
            "use_nonzero_mask": bool(configuration.use_mask_for_norm[channel]) if configuration.use_mask_for_norm else False,
        }
        stats = plans.intensity_stats.get(str(channel))
        if scheme == "ct" and stats is not None:
            entry.update(clip=[stats.percentile_00_5, stats.percentile_99_5], mean=stats.mean, std=stats.std)
        normalization.append(entry)
    return {
        "format": ONNX_PREPROCESSING_FORMAT,
        "schema_version": ONNX_PREPROCESSING_SCHEMA_VERSION,
        "autoseg_version": __version__,
        "dataset_name": plans.dataset_name,
        "configuration": configuration.name,
        "architecture": configuration.architecture.name,
        "channels": dict(plans.channel_names),
        "labels": dict(plans.labels),
        "network": {
            "folds": fold_files,
            "opset": opset,
            "input": {"name": ONNX_INPUT, "dtype": "float32",
                      "shape": ["batch", plans.num_channels, *configuration.patch_size]},
            "output": {"name": ONNX_OUTPUT, "dtype": "float32", "meaning": "logits (softmax not applied)",
                       "shape": ["batch", plans.num_classes, *configuration.patch_size]},
            "dims": dims,
            "ensemble": "softmax of each fold's logits, averaged over folds",
        },
        "axes": {
            "array_order": "numpy order of the image file: (Z, Y, X) for volumes, (Y, X) for 2D images",
            "transpose_forward": plans.transpose_forward,
            "transpose_backward": plans.transpose_backward,
            "note": "transpose the [C, *spatial] image by transpose_forward before everything below; spacing, "
                    "patch size and crop are in that order. 2D configurations predict each slice along the "
                    "first axis of a volume.",
        },
        "crop_to_nonzero": {
            "rule": "crop to the bounding box of voxels nonzero in any channel (holes filled); the segmentation "
                    "is background (0) outside it",
        },
        "normalization": {
            "per_channel": normalization,
            "schemes": {
                "ct": "clip to [clip[0], clip[1]], then (x - mean) / std with the dataset values given",
                "zscore": "(x - mean) / std of this image (inside the nonzero mask when use_nonzero_mask; voxels "
                          "outside it become 0); std floored at 1e-8",
                "rescale_0_1": "(x - min) / (max - min) of this image",
                "rgb_0_1": "x / 255",
                "none": "unchanged",
            },
        },
        "resampling": {
            "target_spacing": list(configuration.target_spacing),
            **asdict(configuration.resampling),
            "rule": "resample the cropped image to target_spacing with spline order order_image; when the spacing's "
                    "max/min exceeds anisotropy_threshold, the coarse axis separately with order_z",
        },
        "sliding_window": {
            "patch_size": list(configuration.patch_size),
            "step_size": 0.5,
            "rule": "windows start every step_size * patch voxels (evenly spread so the last one ends at the "
                    "border); images smaller than the patch are zero-padded and cut back",
            "gaussian_sigma_scale": 1.0 / 8,
            "gaussian": "each window's logits are weighted by a Gaussian (sigma = patch * gaussian_sigma_scale "
                        "per axis, normalised to max 1) and the weighted sum divided by the summed weights",
            # as tensor axes of the network input (the sliding window's sets count from the first spatial axis)
            "mirror_axes": [[axis + 2 for axis in axes] for axes in mirror_axis_sets(dims)],
            "mirror": "run each window flipped along every listed axis set of the [batch, channel, *spatial] "
                      "input, flip the logits back and average them (the empty set is the plain window)",
        },
        "restore": {
            "rule": "log of the fold-mean softmax, resampled back to the cropped original spacing with order "
                    "order_probabilities (order_z along a separately resampled coarse axis), placed into the "
                    "original image (background elsewhere), transposed by transpose_backward; the "
                    "segmentation is its argmax over classes and carries the input's geometry",
        },
    }


def export_onnx(model: TrainedModel, output: str | os.PathLike) -> list[Path]:
    """Write ``fold_<k>.onnx`` per fold and ``preprocessing.json`` into the folder ``output``."""
    folder = Path(output)
    if model.previous is not None:
        raise ConfigurationError(
            f"{model.folder}: '{model.configuration.name}' is a cascade (its input includes the segmentation of "
            f"'{model.previous.configuration.name}'), which preprocessing.json cannot describe; export it as a "
            "bundle, or export each stage's configuration to ONNX separately"
        )
    if folder.suffix in (".zip", ".onnx"):
        raise ConfigurationError(f"{folder}: --format onnx writes a folder (fold_<k>.onnx + preprocessing.json); "
                                 "pass a folder name, e.g. -o model_onnx")
    written, fold_files, opset = [], [], 0
    for fold in model.folds:
        network = build_network(model.configuration, model.in_channels, model.num_classes, fold.state_dict,
                                fold.checkpoint)
        target = folder / f"fold_{fold.fold}.onnx"
        difference, opset = export_network_onnx(network, model.in_channels, model.configuration.patch_size, target,
                                                model.configuration.architecture.name)
        fold_files.append({"fold": fold.fold, "file": target.name, "epoch": fold.epoch,
                           "max_relative_difference_to_torch": difference})
        written.append(target)
        if difference is not None:
            log.info("%s: ONNX Runtime matches torch within %.1e of the logit range", target.name, difference)
    description = preprocessing_description(model.plans, model.configuration, fold_files, opset)
    write_json(folder / "preprocessing.json", description)
    written.append(folder / "preprocessing.json")
    return written


def export_model(
    dataset: str | int,
    configuration: str,
    output: str | os.PathLike,
    format: str = "bundle",
    folds: Sequence[int | str] | None = None,
    root: str | os.PathLike | None = None,
    architecture: str | None = None,
    checkpoint: str = DEFAULT_CHECKPOINT,
) -> list[Path]:
    """``autoseg export`` as a function: the written files (one zip, or the ONNX files + preprocessing.json)."""
    if format not in FORMATS:
        raise ConfigurationError(f"--format {format}: expected one of {', '.join(FORMATS)}")
    model = load_trained_model(dataset, configuration, folds=folds, root=root, architecture=architecture,
                               checkpoint=checkpoint)
    if format == "bundle":
        return [export_bundle(model, output)]
    return export_onnx(model, output)
