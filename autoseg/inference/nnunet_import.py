"""Models trained with nnU-Net v2 as autoseg model bundles (``autoseg import-nnunet``).

An nnU-Net v2 results folder ``<Trainer>__<Plans>__<configuration>/`` holds ``plans.json``, ``dataset.json`` and
``fold_<k>/checkpoint_final.pth``. Its networks are the ones autoseg already builds with the same parameters
(``PlainConvUNet`` = our ``unet``, ``ResidualEncoderUNet`` = our ``resenc``: same layers, same order, same shapes),
so importing is bookkeeping, not conversion:

1. **Plans.** The configuration's entry of nnU-Net's plans.json (``inherits_from`` resolved) becomes our
   :class:`~autoseg.contracts.plans.Configuration`: ``spacing`` -> ``target_spacing``, ``patch_size``,
   ``normalization_schemes`` (``CTNormalization`` -> ``ct`` with the dataset's
   ``foreground_intensity_properties_per_channel`` as :class:`IntensityStats`; ``ZScoreNormalization`` ->
   ``zscore`` with ``use_mask_for_norm``), the resampling orders and ``force_separate_z`` (None: decided per
   case, threshold 3, as both tools do), ``transpose_forward``/``backward``, and the architecture's
   ``arch_kwargs`` (stages, features, kernels, strides). Both tools store spacing and patch in the transposed
   axis order, so no axis is reordered here. Anything autoseg would compute differently is refused by name.
2. **Labels** from nnU-Net's dataset.json; region-based training (``regions_class_order``, label values that are
   lists) and ignore labels are refused for now: our predictor would not know what to do with them.
3. **Weights.** Each fold's ``checkpoint_final.pth`` is read with ``torch.load(weights_only=True)`` and an
   allow-list of exactly the numpy scalar types nnU-Net's training log holds (``numpy.float64`` etc.: a dtype and
   raw bytes, nothing that can name a function); anything else pickled in it is refused with its type named,
   without being executed. The state dict is translated key by key (:data:`KEY_RULES`), every nnU-Net tensor used
   exactly once, every one of our parameters filled exactly once, every shape checked.
4. **Bundle.** :func:`autoseg.inference.bundle.write_bundle` writes the usual bundle, so ``autoseg predict -m``
   runs the model with autoseg's own preprocessing, sliding window and restoration.

Key translation (nnU-Net -> autoseg). nnU-Net's ``state_dict`` names every conv and norm twice (``.conv.`` /
``.norm.`` and ``.all_modules.0.`` / ``.all_modules.1.``, one module registered under two names) and the whole
encoder twice (``encoder.`` and ``decoder.encoder.``: the decoder keeps a reference). Those aliases must hold the
very same values as their canonical key and are then dropped. The canonical keys map as follows (``s`` encoder
stage, ``j`` conv in a stage, ``b`` residual block, ``i`` decoder stage counted from the bottleneck, which is our
order too)::

    PlainConvUNet (unet)
      encoder.stages.s.0.convs.j.conv.*      -> encoder.s.j.0.*
      encoder.stages.s.0.convs.j.norm.*      -> encoder.s.j.1.*
      decoder.stages.i.convs.j.conv.*        -> decoder.i.j.0.*
      decoder.stages.i.convs.j.norm.*        -> decoder.i.j.1.*
    ResidualEncoderUNet (resenc)
      encoder.stem.convs.0.conv.* / norm.*   -> stem.0.* / stem.1.*
      encoder.stages.s.blocks.b.conv1.conv.* -> encoder.s.b.conv1.0.*   (conv1.norm.* -> conv1.1.*)
      encoder.stages.s.blocks.b.conv2.conv.* -> encoder.s.b.conv2.*     (conv2.norm.* -> norm2.*)
      encoder.stages.s.blocks.b.skip.k.conv.weight -> encoder.s.b.skip.k.weight
      encoder.stages.s.blocks.b.skip.k.norm.*      -> encoder.s.b.skip.(k+1).*
                    (both skips are [avg-pool if strided] + 1x1 conv + norm; ours lists the norm as its own entry)
      decoder.stages.i.convs.0.conv.* / norm.* -> decoder.i.0.* / decoder.i.1.*
    both
      decoder.transpconvs.i.*                -> upsample.i.*
      decoder.seg_layers.i.*                 -> heads.i.*

Trainers: any whose checkpoint holds ``network_weights`` of the network its plans describe (``nnUNetTrainer`` and
its variants that change the schedule, epochs, loss or augmentation); a trainer that builds another network
fails the translation with the first key that does not fit. Tested: ``nnUNetTrainer`` (nnU-Net 2.8.1,
benchmarks/nnunet_import_parity.py) and checkpoints written in nnU-Net's format by the tests.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from autoseg import __version__
from autoseg.contracts.plans import (
    NORM_CT,
    NORM_ZSCORE,
    ArchitectureSpec,
    Configuration,
    IntensityStats,
    Plans,
    Resampling,
    validate_plans_identifiers,
)
from autoseg.errors import CheckpointError, ConfigurationError, reraised_as
from autoseg.fileio import read_json
from autoseg.inference.bundle import BundleFold, BundleManifest, write_bundle

log = logging.getLogger(__name__)

NNUNET_CHECKPOINT = "checkpoint_final.pth"
# nnU-Net's network class (last part of network_class_name) -> our registry name
ARCHITECTURES = {"PlainConvUNet": "unet", "ResidualEncoderUNet": "resenc"}
NORMALIZATIONS = {"CTNormalization": NORM_CT, "ZScoreNormalization": NORM_ZSCORE}
# nnU-Net's separate-z threshold (ANISO_THRESHOLD in its preprocessing) and its per-case decision equal ours
ANISOTROPY_THRESHOLD = 3.0
FOLD_FOLDER = re.compile(r"^fold_(\d+|all)$")
IMPORT_HINT = "import a folder nnU-Net v2 (2.3 or newer) trained with its default planner"


# ------------------------------------------------------------------------------------------- key translation
# (nnU-Net canonical key pattern, our key template); templates are formatted with the match's groups, ``k1`` is the
# skip index plus one. Order does not matter: at most one rule matches a key.
_PARAM = r"(weight|bias)"
_CONV_NORM = {"conv": "0", "norm": "1"}
KEY_RULES: dict[str, list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]] = {
    "unet": [
        (re.compile(rf"^encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.{_PARAM}$"),
         lambda m: f"encoder.{m[1]}.{m[2]}.{_CONV_NORM[m[3]]}.{m[4]}"),
        (re.compile(rf"^decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.{_PARAM}$"),
         lambda m: f"decoder.{m[1]}.{m[2]}.{_CONV_NORM[m[3]]}.{m[4]}"),
    ],
    "resenc": [
        (re.compile(rf"^encoder\.stem\.convs\.0\.(conv|norm)\.{_PARAM}$"), lambda m: f"stem.{_CONV_NORM[m[1]]}.{m[2]}"),
        (re.compile(rf"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.conv1\.(conv|norm)\.{_PARAM}$"),
         lambda m: f"encoder.{m[1]}.{m[2]}.conv1.{_CONV_NORM[m[3]]}.{m[4]}"),
        (re.compile(rf"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.conv2\.(conv|norm)\.{_PARAM}$"),
         lambda m: f"encoder.{m[1]}.{m[2]}.{'conv2' if m[3] == 'conv' else 'norm2'}.{m[4]}"),
        (re.compile(rf"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.skip\.(\d+)\.(conv|norm)\.{_PARAM}$"),
         lambda m: f"encoder.{m[1]}.{m[2]}.skip.{int(m[3]) + (0 if m[4] == 'conv' else 1)}.{m[5]}"),
        (re.compile(rf"^decoder\.stages\.(\d+)\.convs\.0\.(conv|norm)\.{_PARAM}$"),
         lambda m: f"decoder.{m[1]}.{_CONV_NORM[m[2]]}.{m[3]}"),
    ],
}
_SHARED_RULES = [
    (re.compile(rf"^decoder\.transpconvs\.(\d+)\.{_PARAM}$"), lambda m: f"upsample.{m[1]}.{m[2]}"),
    (re.compile(rf"^decoder\.seg_layers\.(\d+)\.{_PARAM}$"), lambda m: f"heads.{m[1]}.{m[2]}"),
]
_ALL_MODULES = re.compile(r"\.all_modules\.([01])\.")


def canonical_key(key: str) -> str:
    """The canonical name of an nnU-Net state-dict key: ``decoder.encoder.X`` -> ``encoder.X`` and
    ``.all_modules.0.`` / ``.all_modules.1.`` -> ``.conv.`` / ``.norm.`` (the same module under its other name;
    nnU-Net's conv blocks hold [conv, norm, nonlin] in ``all_modules`` when they have no dropout)."""
    if key.startswith("decoder.encoder."):
        key = key[len("decoder."):]
    return _ALL_MODULES.sub(lambda m: ".conv." if m[1] == "0" else ".norm.", key)


def our_key(nnunet_key: str, architecture: str) -> str | None:
    """Our state-dict key for a canonical nnU-Net key of ``architecture`` ("unet"/"resenc"); None if no rule."""
    for pattern, template in KEY_RULES[architecture] + _SHARED_RULES:
        match = pattern.match(nnunet_key)
        if match:
            return template(match)
    return None


def translate_state_dict(
    weights: dict[str, torch.Tensor], architecture: str, expected: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """nnU-Net's ``network_weights`` as our state dict, checked against ``expected`` (our network's own
    ``state_dict()``: its keys and shapes). Raises CheckpointError naming the first key that does not fit:
    an alias whose values differ from its canonical key, a key no rule knows, two keys for one of ours, a
    shape mismatch, or one of our parameters left without a value."""
    canonical: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: network_weights[{key!r}] is a {type(value).__name__}, expected a "
                                  "tensor; this is not an nnU-Net v2 checkpoint")
        name = canonical_key(key)
        if name == key:
            canonical[key] = value
        else:
            aliases[key] = name
    for alias, name in aliases.items():
        original = canonical.get(name)
        if original is None or original.shape != weights[alias].shape or not torch.equal(original, weights[alias]):
            raise CheckpointError(f"{source}: network_weights[{alias!r}] should repeat {name!r} (nnU-Net registers "
                                  "that module twice) but differs or is missing; the checkpoint was edited or is "
                                  f"not from nnU-Net v2's {architecture} network")
    translated: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in canonical.items():
        target = our_key(key, architecture)
        if target is None or target not in expected:
            raise CheckpointError(
                f"{source}: network_weights key {key!r} has no place in autoseg's '{architecture}' network "
                f"(mapped to {target!r}); the trainer built another network than plans.json describes, which "
                "import-nnunet does not support"
            )
        if target in translated:
            raise CheckpointError(f"{source}: network_weights keys {origin[target]!r} and {key!r} both map to "
                                  f"{target!r}; the checkpoint does not come from nnU-Net v2's {architecture} network")
        if tuple(value.shape) != tuple(expected[target].shape):
            raise CheckpointError(
                f"{source}: network_weights[{key!r}] has shape {tuple(value.shape)}, autoseg's {target!r} expects "
                f"{tuple(expected[target].shape)} from plans.json; the weights belong to another plan or configuration"
            )
        translated[target] = value
        origin[target] = key
    missing = [k for k in expected if k not in translated]
    if missing:
        raise CheckpointError(f"{source}: network_weights has nothing for autoseg's {missing[0]!r} "
                              f"({len(missing)} parameter(s) left empty); the checkpoint does not match plans.json")
    return translated


def nnunet_state_dict(state_dict: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`translate_state_dict`: one of our ``unet``/``resenc`` state dicts under nnU-Net's key
    names, aliases included, as nnU-Net's ``network.state_dict()`` lists them. For tests and for sending a model
    the other way; raises ValueError for a key of ours with no nnU-Net name."""
    inverse = {key: _nnunet_name(key, architecture, value) for key, value in state_dict.items()}
    result: dict[str, torch.Tensor] = {}
    encoder: dict[str, torch.Tensor] = {}
    for ours, theirs in inverse.items():
        value = state_dict[ours]
        result[theirs] = value
        alias = re.sub(r"\.(conv|norm)\.(weight|bias)$", lambda m: f".all_modules.{_CONV_NORM[m[1]]}.{m[2]}", theirs)
        if alias != theirs:
            result[alias] = value
        if theirs.startswith("encoder."):
            encoder[theirs] = value
            if alias != theirs:
                encoder[alias] = value
    # nnU-Net's decoder holds the encoder as an attribute, so its state dict repeats it under decoder.encoder.
    result.update({f"decoder.{key}": value for key, value in encoder.items()})
    return result


_INVERSE_RULES: dict[str, list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]] = {
    "unet": [
        (re.compile(rf"^encoder\.(\d+)\.(\d+)\.([01])\.{_PARAM}$"),
         lambda m: f"encoder.stages.{m[1]}.0.convs.{m[2]}.{'conv' if m[3] == '0' else 'norm'}.{m[4]}"),
        (re.compile(rf"^decoder\.(\d+)\.(\d+)\.([01])\.{_PARAM}$"),
         lambda m: f"decoder.stages.{m[1]}.convs.{m[2]}.{'conv' if m[3] == '0' else 'norm'}.{m[4]}"),
    ],
    "resenc": [
        (re.compile(rf"^stem\.([01])\.{_PARAM}$"),
         lambda m: f"encoder.stem.convs.0.{'conv' if m[1] == '0' else 'norm'}.{m[2]}"),
        (re.compile(rf"^encoder\.(\d+)\.(\d+)\.conv1\.([01])\.{_PARAM}$"),
         lambda m: f"encoder.stages.{m[1]}.blocks.{m[2]}.conv1.{'conv' if m[3] == '0' else 'norm'}.{m[4]}"),
        (re.compile(rf"^encoder\.(\d+)\.(\d+)\.(conv2|norm2)\.{_PARAM}$"),
         lambda m: f"encoder.stages.{m[1]}.blocks.{m[2]}.conv2.{'conv' if m[3] == 'conv2' else 'norm'}.{m[4]}"),
        (re.compile(rf"^decoder\.(\d+)\.([01])\.{_PARAM}$"),
         lambda m: f"decoder.stages.{m[1]}.convs.0.{'conv' if m[2] == '0' else 'norm'}.{m[3]}"),
    ],
}
_INVERSE_SHARED = [
    (re.compile(rf"^upsample\.(\d+)\.{_PARAM}$"), lambda m: f"decoder.transpconvs.{m[1]}.{m[2]}"),
    (re.compile(rf"^heads\.(\d+)\.{_PARAM}$"), lambda m: f"decoder.seg_layers.{m[1]}.{m[2]}"),
]
_OUR_SKIP = re.compile(rf"^encoder\.(\d+)\.(\d+)\.skip\.(\d+)\.{_PARAM}$")


def _nnunet_name(key: str, architecture: str, value: torch.Tensor) -> str:
    skip = _OUR_SKIP.match(key) if architecture == "resenc" else None
    if skip:
        # our skip lists [avg-pool], 1x1 conv (no bias), norm as separate entries; nnU-Net nests conv and norm in
        # one entry. A 1-D tensor is the norm's (the conv weight has kernel axes), at one position after the conv.
        position, is_norm = int(skip[3]), value.ndim == 1
        block = f"encoder.stages.{skip[1]}.blocks.{skip[2]}.skip"
        return f"{block}.{position - 1}.norm.{skip[4]}" if is_norm else f"{block}.{position}.conv.{skip[4]}"
    for pattern, template in _INVERSE_RULES[architecture] + _INVERSE_SHARED:
        match = pattern.match(key)
        if match:
            return template(match)
    raise ValueError(f"autoseg key {key!r} of a '{architecture}' network has no nnU-Net name")


# ------------------------------------------------------------------------------------------------- plans
def _class_name(value: Any) -> str:
    """``"torch.nn.modules.conv.Conv3d"`` -> ``"Conv3d"`` (nnU-Net stores classes as dotted import paths)."""
    return str(value).rsplit(".", 1)[-1] if value is not None else "None"


def _per_axis(values: Sequence[Any], dims: int, what: str, source: str) -> list[list[int]]:
    """nnU-Net allows an int for "the same on every axis"; ours are always one list per stage of ``dims`` ints."""
    result = []
    for value in values:
        entry = [int(value)] * dims if isinstance(value, (int, float)) else [int(v) for v in value]
        if len(entry) != dims:
            raise ConfigurationError(f"{source}: {what} entry {value!r} has {len(entry)} axes, expected {dims}; "
                                     "plans.json is inconsistent")
        result.append(entry)
    return result


def resolve_configuration(configurations: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    """nnU-Net's configuration ``name`` with its ``inherits_from`` chain merged (the child's keys win)."""
    if name not in configurations:
        raise ConfigurationError(f"{source}: no configuration {name!r}; it has {', '.join(sorted(configurations))}. "
                                 "The results folder name <Trainer>__<Plans>__<configuration> names one of those")
    chain, current = [], name
    while current is not None:
        if current in chain or current not in configurations:
            raise ConfigurationError(f"{source}: configuration {name!r} inherits from {current!r}, which is "
                                     "missing or circular; fix plans.json")
        chain.append(current)
        current = configurations[current].get("inherits_from")
    merged: dict[str, Any] = {}
    for entry in reversed(chain):
        merged.update(configurations[entry])
    return merged


def architecture_from_nnunet(entry: dict[str, Any], patch_size: list[int], source: str) -> ArchitectureSpec:
    """nnU-Net's ``architecture`` entry (``network_class_name`` + ``arch_kwargs``) as our ArchitectureSpec.
    Refused (ConfigurationError naming the value): a network other than PlainConvUNet/ResidualEncoderUNet, and
    any option our network would build differently (conv without bias, another norm, dropout, another slope)."""
    if not isinstance(entry, dict) or "network_class_name" not in entry:
        raise ConfigurationError(f"{source}: the configuration has no 'architecture' entry with a network_class_name "
                                 f"(plans of nnU-Net before 2.3); {IMPORT_HINT}")
    class_name = _class_name(entry["network_class_name"])
    if class_name not in ARCHITECTURES:
        raise ConfigurationError(f"{source}: network class {entry['network_class_name']!r} is not supported; "
                                 f"import-nnunet maps {', '.join(ARCHITECTURES)} only")
    name = ARCHITECTURES[class_name]
    kwargs = entry.get("arch_kwargs") or {}
    dims = len(patch_size)
    try:
        n_stages = int(kwargs["n_stages"])
        features = [int(f) for f in kwargs["features_per_stage"]]
        kernels = _per_axis(kwargs["kernel_sizes"], dims, "kernel_sizes", source)
        strides = _per_axis(kwargs["strides"], dims, "strides", source)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"{source}: arch_kwargs lack n_stages/features_per_stage/kernel_sizes/strides "
                                 f"({exc!r}); {IMPORT_HINT}") from exc
    if not len(features) == len(kernels) == len(strides) == n_stages:
        raise ConfigurationError(f"{source}: arch_kwargs give {n_stages} stages but {len(features)} features, "
                                 f"{len(kernels)} kernels, {len(strides)} strides; plans.json is inconsistent")

    def require(field_name: str, found: Any, expected: Any, why: str) -> None:
        if found != expected:
            raise ConfigurationError(f"{source}: arch_kwargs {field_name} is {found!r}, import-nnunet supports "
                                     f"{expected!r} only ({why})")

    require("conv_op", _class_name(kwargs.get("conv_op")), f"Conv{dims}d", f"a {dims}D patch needs {dims}D convs")
    require("conv_bias", bool(kwargs.get("conv_bias", False)), True, "our conv blocks keep their bias")
    require("norm_op", _class_name(kwargs.get("norm_op")), f"InstanceNorm{dims}d", "nnU-Net's default")
    norm_kwargs = kwargs.get("norm_op_kwargs") or {}
    require("norm_op_kwargs", (float(norm_kwargs.get("eps", 1e-5)), bool(norm_kwargs.get("affine", False))),
            (1e-5, True), "eps 1e-5 with affine parameters")
    require("dropout_op", kwargs.get("dropout_op"), None, "no dropout at inference")
    options: dict[str, Any] = {}
    nonlin = _class_name(kwargs.get("nonlin"))
    slope = float((kwargs.get("nonlin_kwargs") or {}).get("negative_slope", 0.01))
    if nonlin == "ReLU":
        options["activation"] = "relu"
    else:
        require("nonlin (and its negative_slope)", (nonlin, slope), ("LeakyReLU", 0.01), "our LeakyReLU slope")
    decoder_convs = [int(n) for n in kwargs.get("n_conv_per_stage_decoder", [])]
    if name == "unet":
        require("n_conv_per_stage", [int(n) for n in kwargs.get("n_conv_per_stage", [])], [2] * n_stages,
                "our plain U-Net has two convs per encoder stage")
        require("n_conv_per_stage_decoder", decoder_convs, [2] * (n_stages - 1), "two convs per decoder stage")
    else:
        options["blocks_per_stage"] = [int(n) for n in kwargs.get("n_blocks_per_stage", [])]
        require("n_conv_per_stage_decoder", decoder_convs, [1] * (n_stages - 1), "one conv per decoder stage")
    return ArchitectureSpec(name=name, patch_size=list(patch_size), strides=strides, kernel_sizes=kernels,
                            features=features, deep_supervision=True, options=options)


def _resampling(config: dict[str, Any], source: str) -> Resampling:
    data = config.get("resampling_fn_data_kwargs") or {}
    seg = config.get("resampling_fn_seg_kwargs") or {}
    probabilities = config.get("resampling_fn_probabilities_kwargs") or {}
    for key in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities"):
        if config.get(key, "resample_data_or_seg_to_shape") != "resample_data_or_seg_to_shape":
            raise ConfigurationError(f"{source}: {key} is {config[key]!r}, import-nnunet supports nnU-Net's default "
                                     "'resample_data_or_seg_to_shape' only")
    separate = {data.get("force_separate_z"), seg.get("force_separate_z"), probabilities.get("force_separate_z")}
    orders_z = {int(kw.get("order_z", 0)) for kw in (data, seg, probabilities)}
    if len(separate) != 1 or len(orders_z) != 1:
        raise ConfigurationError(f"{source}: force_separate_z/order_z differ between data, segmentation and "
                                 "probabilities; autoseg uses one rule for all three, adjust plans.json")
    return Resampling(order_image=int(data.get("order", 3)), order_label=int(seg.get("order", 1)),
                      order_probabilities=int(probabilities.get("order", 1)), order_z=orders_z.pop(),
                      separate_z=separate.pop(), anisotropy_threshold=ANISOTROPY_THRESHOLD)


def labels_from_dataset_json(dataset: dict[str, Any], source: str) -> dict[str, int]:
    """nnU-Net's dataset.json labels as ours (name -> 0..K-1); region-based and ignore labels refused."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ConfigurationError(f"{source}: no 'labels' mapping in dataset.json; expected e.g. "
                                 '{"background": 0, "liver": 1}')
    if "regions_class_order" in dataset or any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise ConfigurationError(f"{source}: the model was trained on regions (labels with lists of values, "
                                 "regions_class_order); import-nnunet supports one class per label only for now")
    if "ignore" in labels:
        raise ConfigurationError(f"{source}: dataset.json has an 'ignore' label; import-nnunet does not support "
                                 "ignore labels yet")
    try:
        result = {str(name): int(value) for name, value in labels.items()}
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{source}: labels values must be integers ({exc}); fix dataset.json") from exc
    if sorted(result.values()) != list(range(len(result))):
        raise ConfigurationError(f"{source}: label values {sorted(result.values())} are not 0..{len(result) - 1}; "
                                 "nnU-Net requires consecutive labels, fix dataset.json")
    return result


def plans_from_nnunet(nnunet_plans: dict[str, Any], dataset: dict[str, Any], configuration_name: str,
                      source: str) -> Plans:
    """Our Plans holding one configuration: ``configuration_name`` of nnU-Net's plans.json (``source`` names the
    file in messages). See the module docstring for what maps to what."""
    configurations = nnunet_plans.get("configurations")
    if not isinstance(configurations, dict):
        raise ConfigurationError(f"{source}: no 'configurations' in plans.json; expected nnU-Net v2 plans")
    config = resolve_configuration(configurations, configuration_name, source)
    if config.get("previous_stage"):
        raise ConfigurationError(f"{source}: configuration {configuration_name!r} is a cascade stage (previous_stage "
                                 f"{config['previous_stage']!r}); import-nnunet does not import cascades yet")
    try:
        patch_size = [int(p) for p in config["patch_size"]]
        spacing = [float(s) for s in config["spacing"]]
        schemes = list(config["normalization_schemes"])
        masks = [bool(m) for m in config["use_mask_for_norm"]]
        transpose_forward = [int(a) for a in nnunet_plans["transpose_forward"]]
        median_spacing = [float(s) for s in nnunet_plans["original_median_spacing_after_transp"]]
        median_shape = [float(s) for s in nnunet_plans["original_median_shape_after_transp"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"{source}: configuration {configuration_name!r} lacks {exc!s} or holds a value "
                                 f"of the wrong type; {IMPORT_HINT}") from exc
    dims = len(patch_size)
    if dims not in (2, 3) or len(spacing) != dims:
        raise ConfigurationError(f"{source}: patch_size {patch_size} and spacing {spacing} of {configuration_name!r} "
                                 "must both have 2 or 3 entries")
    if len(median_shape) == 3 and median_shape[0] == 1 and dims == 2:
        # nnU-Net reads 2D images as 3D with one slice; autoseg reads them as 2D arrays, so the axes would not line up
        raise ConfigurationError(f"{source}: the model was trained on 2D images (median shape {median_shape}); "
                                 "import-nnunet supports models of 3D images (2d and 3d configurations) only for now")
    channels = dataset.get("channel_names") or dataset.get("modality")
    if not isinstance(channels, dict) or not channels:
        raise ConfigurationError(f"{source}: dataset.json has no channel_names; expected e.g. {{\"0\": \"CT\"}}")
    channel_names = {str(k): str(v) for k, v in channels.items()}
    if len(schemes) != len(channel_names) or len(masks) != len(channel_names):
        raise ConfigurationError(f"{source}: {len(schemes)} normalization_schemes for {len(channel_names)} channels; "
                                 "plans.json and dataset.json do not belong together")
    unknown = [s for s in schemes if s not in NORMALIZATIONS]
    if unknown:
        raise ConfigurationError(f"{source}: normalization scheme {unknown[0]!r} is not supported; import-nnunet "
                                 f"maps {', '.join(NORMALIZATIONS)} only")
    properties = nnunet_plans.get("foreground_intensity_properties_per_channel") or {}
    intensity_stats: dict[str, IntensityStats] = {}
    for channel, stats in properties.items():
        try:
            intensity_stats[str(channel)] = IntensityStats(**{k: float(stats[k]) for k in (
                "mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")})
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"{source}: foreground_intensity_properties_per_channel[{channel!r}] lacks "
                                     f"{exc!s}; fix plans.json") from exc
    for channel, scheme in enumerate(schemes):
        if scheme == "CTNormalization" and str(channel) not in intensity_stats:
            raise ConfigurationError(f"{source}: channel {channel} uses CTNormalization but "
                                     "foreground_intensity_properties_per_channel has no entry for it; fix plans.json")
    architecture = architecture_from_nnunet(config.get("architecture"), patch_size, source)
    # both tools keep median spacing/shape of the plans in the transposed order; ours in the raw one
    backward = sorted(range(len(transpose_forward)), key=lambda axis: transpose_forward[axis])
    configuration = Configuration(
        name=configuration_name, data_identifier=configuration_name, dims=dims, target_spacing=spacing,
        patch_size=patch_size, batch_size=int(config.get("batch_size", 2)),
        median_shape=[float(m) for m in config.get("median_image_size_in_voxels", patch_size)],
        normalization=[NORMALIZATIONS[s] for s in schemes], use_mask_for_norm=masks,
        resampling=_resampling(config, source), architecture=architecture,
        notes=[f"imported from nnU-Net v2 plans {nnunet_plans.get('plans_name', '?')!r}, configuration "
               f"{configuration_name!r} (autoseg import-nnunet)"],
    )
    plans = Plans(
        dataset_name=str(nnunet_plans.get("dataset_name") or dataset.get("name") or "imported"),
        channel_names=channel_names, labels=labels_from_dataset_json(dataset, source),
        file_ending=str(dataset.get("file_ending", ".nii.gz")), configurations={configuration_name: configuration},
        default_configurations=[configuration_name], intensity_stats=intensity_stats,
        median_spacing=[median_spacing[a] for a in backward], median_shape=[median_shape[a] for a in backward],
        transpose_forward=transpose_forward,
    )
    validate_plans_identifiers(plans, source)
    return plans


# ------------------------------------------------------------------------------------------- checkpoints
def _allowed_numpy_globals() -> list[Any]:
    """Exactly what a numpy scalar (``numpy.float64(0.93)`` in nnU-Net's training log) needs to unpickle: the
    scalar constructor, ``numpy.dtype`` and the numeric dtype classes. They rebuild a number from a dtype and raw
    bytes; none can call anything else."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed: list[Any] = [scalar, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in ("Float16DType", "Float32DType", "Float64DType", "Int8DType", "Int16DType", "Int32DType",
                     "Int64DType", "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "BoolDType"):
            if hasattr(dtypes, name):
                allowed.append(getattr(dtypes, name))
    return allowed


def load_nnunet_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint read without running code: ``torch.load(weights_only=True)`` (tensors, containers,
    primitives) plus the numpy scalar types of :func:`_allowed_numpy_globals`. Anything else pickled in it (a
    custom class, a function) is refused with its name: CheckpointError, nothing executed."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass --checkpoint with the file name nnU-Net wrote "
                              f"in each fold_<k> folder (default {NNUNET_CHECKPOINT})")
    # torch.serialization.safe_globals arrived in torch 2.5; older torch reads tensors and primitives only, which
    # refuses nnU-Net's numpy numbers (the message below then says to upgrade)
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    allowed = safe_globals(_allowed_numpy_globals()) if safe_globals is not None else contextlib.nullcontext()
    try:
        with allowed:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises UnpicklingError, zip errors, RuntimeError
        offending = ""
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            allowed = {f"{g.__module__}.{g.__qualname__}" for g in _allowed_numpy_globals()}
            unsafe = [name for name in unsafe if name not in allowed]
            if unsafe:
                offending = f"it pickles {', '.join(unsafe[:3])}, "
        except Exception:  # noqa: BLE001 - not a torch zip at all: the first message says enough
            pass
        first_line = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: cannot be read as data only ({offending or ''}{first_line}); import-nnunet never runs code "
            "from a checkpoint: expected an nnU-Net v2 checkpoint of tensors, numbers and strings"
            + ("; torch >= 2.5 is needed to read the numpy numbers in nnU-Net's log, upgrade torch"
               if safe_globals is None else "")
        ) from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        found = sorted(checkpoint)[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path}: expected an nnU-Net v2 checkpoint (a dict with network_weights), found "
                              f"{found}; pass the fold's checkpoint_final.pth or checkpoint_best.pth")
    return checkpoint


def fold_checkpoints(
    results_folder: Path, folds: Sequence[int | str] | None, checkpoint: str
) -> list[tuple[int | str, Path]]:
    """(fold, checkpoint path) for ``folds`` (default: every fold_<k> folder holding ``checkpoint``)."""
    if folds is None:
        found = []
        for entry in sorted(results_folder.iterdir()):
            match = FOLD_FOLDER.match(entry.name)
            if match and (entry / checkpoint).is_file():
                found.append((int(match[1]) if match[1].isdigit() else match[1], entry / checkpoint))
        if not found:
            raise CheckpointError(f"{results_folder}: no fold_<k>/{checkpoint} found; expected a trained nnU-Net v2 "
                                  "results folder <Trainer>__<Plans>__<configuration> (or pass --checkpoint)")
        return found
    chosen = []
    for fold in folds:
        name = str(fold)
        path = results_folder / f"fold_{name}" / checkpoint
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; fold {name} was not trained or the checkpoint has another "
                                  "name (--checkpoint)")
        chosen.append((int(name) if name.isdigit() else name, path))
    return chosen


def _mirroring_note(axes: Any, dims: int, source: str) -> str | None:
    """A warning when the trainer allowed other mirror axes than all of them (autoseg mirrors all or none)."""
    if axes is not None and sorted(int(a) for a in axes) == list(range(dims)):
        return None
    return (f"{source}: trained with inference mirroring axes {axes!r}, but autoseg mirrors over all axes or none; "
            "predict with --no-mirror to stay closest to nnU-Net")


# ------------------------------------------------------------------------------------------------ import
@dataclass
class ImportedModel:
    """What :func:`import_nnunet` read: our plans (one configuration), the weights per fold under our keys, the
    raw dataset.json, and the trainer that wrote the checkpoints."""

    plans: Plans
    configuration: Configuration
    folds: list[tuple[BundleFold, dict[str, torch.Tensor]]]
    dataset_json: dict[str, Any]
    trainer_name: str
    warnings: list[str] = field(default_factory=list)

    @property
    def in_channels(self) -> int:
        return self.plans.num_channels

    @property
    def num_classes(self) -> int:
        return self.plans.num_classes


def parse_results_folder_name(folder: Path) -> tuple[str, str, str]:
    """``nnUNetTrainer__nnUNetPlans__3d_fullres`` -> (trainer, plans identifier, configuration)."""
    parts = folder.name.split("__")
    if len(parts) != 3 or not all(parts):
        raise ConfigurationError(f"{folder}: expected an nnU-Net v2 results folder named "
                                 "<Trainer>__<Plans>__<configuration> (e.g. nnUNetTrainer__nnUNetPlans__3d_fullres)")
    return parts[0], parts[1], parts[2]


def read_nnunet_model(results_folder: str | os.PathLike, folds: Sequence[int | str] | None = None,
                      checkpoint: str = NNUNET_CHECKPOINT) -> ImportedModel:
    """Read and translate an nnU-Net v2 results folder (see the module docstring); nothing is written."""
    from autoseg import networks

    folder = Path(results_folder)
    if not folder.is_dir():
        raise ConfigurationError(f"{folder}: not a folder; pass an nnU-Net v2 results folder "
                                 "<Trainer>__<Plans>__<configuration> holding plans.json and fold_<k>/")
    trainer, _, configuration_name = parse_results_folder_name(folder)
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise ConfigurationError(f"{folder / name}: not found; nnU-Net writes it beside the fold folders, copy "
                                     "the whole results folder")
    dataset_json = read_json(folder / "dataset.json")
    plans = plans_from_nnunet(read_json(folder / "plans.json"), dataset_json, configuration_name,
                              str(folder / "plans.json"))
    configuration = plans.configurations[configuration_name]
    spec = configuration.architecture
    with reraised_as(ConfigurationError, networks.NetworkError):
        reference = networks.build(spec.network_spec(plans.num_channels, plans.num_classes))
    expected = reference.state_dict()
    del reference
    imported: list[tuple[BundleFold, dict[str, torch.Tensor]]] = []
    warnings: list[str] = []
    trainers = set()
    for fold, path in fold_checkpoints(folder, folds, checkpoint):
        loaded = load_nnunet_checkpoint(path)
        trainers.add(str(loaded.get("trainer_name", trainer)))
        init_args = loaded.get("init_args") if isinstance(loaded.get("init_args"), dict) else {}
        if init_args.get("configuration") not in (None, configuration_name):
            raise CheckpointError(f"{path}: trained as configuration {init_args['configuration']!r}, but the folder "
                                  f"name says {configuration_name!r}; the fold was copied into the wrong folder")
        note = _mirroring_note(loaded.get("inference_allowed_mirroring_axes"), configuration.dims, str(path))
        if note and note not in warnings:
            warnings.append(note)
        weights = translate_state_dict(loaded["network_weights"], spec.name, expected, str(path))
        epoch = loaded.get("current_epoch")
        imported.append((BundleFold(fold=fold, weights="", epoch=int(epoch) if isinstance(epoch, int) else None,
                                    checkpoint=f"{folder.name}/fold_{fold}/{checkpoint}"), weights))
        del loaded
    return ImportedModel(plans=plans, configuration=configuration, folds=imported, dataset_json=dataset_json,
                         trainer_name=", ".join(sorted(trainers)), warnings=warnings)


def import_nnunet(results_folder: str | os.PathLike, output: str | os.PathLike,
                  folds: Sequence[int | str] | None = None, checkpoint: str = NNUNET_CHECKPOINT) -> Path:
    """Write an nnU-Net v2 results folder as an autoseg model bundle (``output``, a .zip); returns its path."""
    output = Path(output)
    if output.suffix != ".zip":
        raise ConfigurationError(f"{output}: a model bundle is a zip file; name it like model.zip")
    model = read_nnunet_model(results_folder, folds, checkpoint)
    for warning in model.warnings:
        log.warning(warning)
    configuration_json = asdict(model.configuration)  # the form checkpoints and bundles store it in
    manifest = BundleManifest(
        dataset_name=model.plans.dataset_name, configuration=model.configuration.name,
        architecture=model.configuration.architecture.name, in_channels=model.in_channels,
        num_classes=model.num_classes, folds=[], checksums={}, autoseg_version=__version__,
    )
    log.info("nnU-Net %s (%s) -> autoseg %s, %d fold(s)", model.trainer_name, model.configuration.name,
             model.configuration.architecture.name, len(model.folds))
    return write_bundle(output, manifest, model.plans, configuration_json, model.folds, model.dataset_json)

