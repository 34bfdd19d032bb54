"""plans.json: what the planner decided, as dataclasses. Every later stage reads these, never raw dicts.

A *configuration* is one way of training on the dataset: a data resolution (``data_identifier``: which
preprocessed folder it reads) plus an architecture and its topology. Several configurations may share one
preprocessed folder: ``3d_fullres`` (plain U-Net) and ``3d_fullres_unetrpp`` both read ``3d_fullres``.

Axis conventions (style.md): ``patch_size``, ``strides`` and ``kernel_sizes`` are in array axis order;
``target_spacing`` has one entry per *network* axis: 3 for 3D configurations, 2 (in-plane) for 2D ones,
whose slices keep their own out-of-plane spacing. Configurations work in the *transposed* axis order
(``Plans.transpose_forward``: the coarse axis first), which is the raw order for most data.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from autoseg.dataset.labels import LabelScheme
from autoseg.errors import ConfigurationError
from autoseg.fileio import read_json, write_json

PLANS_SCHEMA_VERSION = 1
PLANS_FILE = "plans.json"

# Channel normalisation schemes (chosen per channel by its name in dataset.json; see docs/planning.md).
NORM_CT = "ct"  # clip to dataset foreground [p0.5, p99.5], subtract foreground mean, divide by its std
NORM_ZSCORE = "zscore"  # per-image mean/std (inside the nonzero mask when use_mask_for_norm)
NORM_NONE = "none"
NORM_RESCALE = "rescale_0_1"  # min-max per image
NORM_RGB = "rgb_0_1"  # divide by 255
NORMALIZATION_SCHEMES = (NORM_CT, NORM_ZSCORE, NORM_NONE, NORM_RESCALE, NORM_RGB)

# Names read from JSON that become parts of paths (configuration names, data_identifier, architecture names,
# dataset names, case ids): one path component, never a separator, never "." or "..", so a hand-edited or
# foreign plans.json cannot make a stage write or delete outside the data root.
IDENTIFIER = re.compile(r"^[A-Za-z0-9_.+-]+$")
IDENTIFIER_RULE = "letters, digits, _ - . + only (no path separators, not '.' or '..')"


def validate_identifier(value: Any, field_name: str, source: str | os.PathLike) -> str:
    """``value`` when it is a safe path component, else a ConfigurationError naming ``source`` (the JSON
    file), the field and the value."""
    if not isinstance(value, str) or not IDENTIFIER.match(value) or value in (".", ".."):
        raise ConfigurationError(
            f"{source}: {field_name} {value!r} is not a valid name: expected {IDENTIFIER_RULE}; fix the file or "
            "re-run `autoseg plan`"
        )
    return value


def validate_plans_identifiers(plans: "Plans", source: str | os.PathLike) -> None:
    """Every name in ``plans`` that a stage turns into a path (see IDENTIFIER)."""
    validate_identifier(plans.dataset_name, "dataset_name", source)
    for key, config in plans.configurations.items():
        validate_identifier(key, "configuration name", source)
        where = f"configurations[{key!r}]"
        validate_identifier(config.name, f"{where}.name", source)
        validate_identifier(config.data_identifier, f"{where}.data_identifier", source)
        validate_identifier(config.architecture.name, f"{where}.architecture.name", source)
        if config.previous_stage is not None:
            validate_identifier(config.previous_stage, f"{where}.previous_stage", source)
    for name in plans.default_configurations:
        validate_identifier(name, "default_configurations entry", source)


# --------------------------------------------------------------------------------- axis transposition
# The plan's transpose_forward/transpose_backward are each other's inverse; preprocessing and restoring undo
# one with the other, so the inverse belongs to the plan's contract rather than to the planner's rules.
def inverse_permutation(order: Sequence[int]) -> list[int]:
    """The permutation that undoes ``order``: ``values[order][inverse] == values`` (e.g. [2, 0, 1] -> [1, 2, 0])."""
    order = [int(a) for a in order]
    if sorted(order) != list(range(len(order))):
        raise ValueError(f"{order} is not a permutation of the axes 0..{len(order) - 1}")
    inverse = [0] * len(order)
    for position, axis in enumerate(order):
        inverse[axis] = position
    return inverse


@dataclass
class IntensityStats:
    """Foreground intensity statistics of one channel over the whole dataset (fingerprint)."""

    mean: float
    std: float
    median: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass
class Resampling:
    """How arrays are resampled to the target spacing and back (preprocessing and restore).

    ``separate_z``: resample the coarse axis (``coarse_axis``) on its own with ``order_z``, the other axes with
    ``order_image`` / ``order_label``; decided per case when None (anisotropy > ``anisotropy_threshold``).
    """

    order_image: int = 3
    order_label: int = 1  # applied to one-hot labels, then argmax: keeps thin structures
    order_probabilities: int = 1
    order_z: int = 0
    separate_z: bool | None = None
    anisotropy_threshold: float = 3.0
    coarse_axis: int | None = None  # the axis resampled on its own when separate_z is True (array order)


@dataclass
class ArchitectureSpec:
    """The network of a configuration, as numbers; :meth:`network_spec` gives what ``autoseg.networks.build``
    takes."""

    name: str
    patch_size: list[int]
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    features: list[int]
    deep_supervision: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    def network_spec(self, in_channels: int, num_classes: int) -> Any:
        """The ``autoseg.networks.NetworkSpec`` of this architecture for ``in_channels`` inputs (see
        ``Plans.network_in_channels``) and ``num_classes`` outputs. Imported here, not at module level: the
        preprocessing workers import the plans and should not pay for torch."""
        from autoseg.networks import NetworkSpec

        return NetworkSpec(self.name, in_channels, num_classes, self.patch_size, self.strides, self.kernel_sizes,
                           self.features, self.deep_supervision, self.options)


@dataclass
class Configuration:
    name: str  # e.g. "3d_fullres", "2d", "3d_fullres_unetrpp", "2d_unet2022"
    data_identifier: str  # preprocessed folder it reads: "2d", "3d_fullres", "3d_lowres"
    dims: int  # 2 or 3: dimensionality of the network and its patches
    target_spacing: list[float]
    patch_size: list[int]
    batch_size: int
    median_shape: list[float]  # median image shape at target spacing (network axes)
    normalization: list[str]  # one scheme per channel
    use_mask_for_norm: list[bool]
    resampling: Resampling
    architecture: ArchitectureSpec
    memory_estimate_bytes: int = 0  # training memory the patch/batch choice was based on
    previous_stage: str | None = None  # cascade: configuration whose predictions become extra inputs
    notes: list[str] = field(default_factory=list)  # human-readable reasons for decisions

    @property
    def architecture_name(self) -> str:
        return self.architecture.name

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Configuration":
        """A configuration from its ``asdict`` form (an entry of plans.json, or as checkpoints and bundles
        store it)."""
        fields = dict(data)
        fields["resampling"] = Resampling(**fields["resampling"])
        fields["architecture"] = ArchitectureSpec(**fields["architecture"])
        return cls(**fields)


@dataclass
class Plans:
    dataset_name: str
    channel_names: dict[str, str]
    labels: dict[str, int | list[int]]  # dataset.json's labels; a list is a region
    file_ending: str
    configurations: dict[str, Configuration]
    default_configurations: list[str]  # trained by default / compared by find-best
    intensity_stats: dict[str, IntensityStats]  # per channel index (as string), for CT normalisation
    median_spacing: list[float]  # dataset median spacing (the raw files' array order, as in fingerprint.json)
    median_shape: list[float]  # dataset median shape after crop (raw array order)
    gpu_memory_gb: float = 8.0
    # The raw array axes in the order every configuration works in: preprocessing transposes each image by
    # ``transpose_forward`` first, restoring transposes back by ``transpose_backward`` (its inverse). Coarse
    # axis first (docs/planning.md, "The coarse axis"). None (plans written before the field) = identity.
    transpose_forward: list[int] | None = None
    transpose_backward: list[int] | None = None
    # configurations the planner left out -> the one-line reason (an architecture whose constraints the
    # dataset cannot meet). Optional, so plans written before it existed still load (same schema version).
    skipped: dict[str, str] = field(default_factory=dict)
    # the planning preset these plans were made with (``autoseg plan --preset``, planning/presets.py), None for
    # the default planner; optional, so plans written before it existed still load (same schema version)
    preset: str | None = None
    # region datasets (docs/datasets.md): dataset.json's regions_class_order, and its label key order, which
    # orders the regions (this file is written with sorted keys). None for plain datasets; optional, so plans
    # written before they existed still load (same schema version).
    regions_class_order: list[int] | None = None
    label_order: list[str] | None = None
    schema_version: int = PLANS_SCHEMA_VERSION

    def __post_init__(self) -> None:
        identity = list(range(len(self.median_spacing)))
        forward = identity if self.transpose_forward is None else [int(a) for a in self.transpose_forward]
        if sorted(forward) != identity:
            raise ConfigurationError(
                f"plans.json: transpose_forward {forward} is not an order of the {len(identity)} image axes "
                f"{identity}; fix it or re-run `autoseg plan`"
            )
        backward = inverse_permutation(forward)
        if self.transpose_backward is not None and [int(a) for a in self.transpose_backward] != backward:
            raise ConfigurationError(
                f"plans.json: transpose_backward {list(self.transpose_backward)} is not the inverse of "
                f"transpose_forward {forward}; set it to {backward}"
            )
        self.transpose_forward, self.transpose_backward = forward, backward

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_scheme(self) -> LabelScheme:
        """What the labels mean (autoseg.dataset.labels): classes or regions, the ignore value."""
        return LabelScheme.from_labels(self.labels, self.regions_class_order, self.label_order)

    @property
    def num_classes(self) -> int:
        """Network output channels: plain datasets, one per class with background (softmax), as always;
        region datasets, one per region (sigmoid); an ``ignore`` label is never an output."""
        return self.label_scheme.num_outputs

    def network_in_channels(self, configuration: Configuration) -> int:
        """Input channels of ``configuration``'s network: the image channels, plus for a cascade stage one
        channel per foreground class of the previous stage's segmentation (background gets none), or per
        region for region datasets."""
        extra = len(self.label_scheme.evaluation_units()) if configuration.previous_stage else 0
        return self.num_channels + extra

    def configuration(self, name: str, architecture: str | None = None) -> Configuration:
        """Look up a configuration by name, or by base name + architecture (``"3d_fullres", "unetrpp"``)."""
        candidates = [name]
        if architecture:
            candidates = [f"{name}_{architecture}", name]
        for candidate in candidates:
            config = self.configurations.get(candidate)
            if config is not None and (architecture is None or config.architecture.name == architecture):
                return config
        wanted = f"'{name}'" + (f" with architecture '{architecture}'" if architecture else "")
        available = ", ".join(
            f"{n} ({c.architecture.name})" for n, c in sorted(self.configurations.items())
        )
        raise ConfigurationError(
            f"plans for {self.dataset_name} have no configuration {wanted}; available: {available}. "
            "Re-run `autoseg plan` with --arch/--configs to add it"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plans":
        version = data.get("schema_version")
        if version != PLANS_SCHEMA_VERSION:
            raise ConfigurationError(
                f"plans schema version {version!r} is not {PLANS_SCHEMA_VERSION}; re-run `autoseg plan`"
            )
        configurations = {key: Configuration.from_json(raw) for key, raw in data["configurations"].items()}
        fields = dict(data)
        fields["configurations"] = configurations
        fields["intensity_stats"] = {k: IntensityStats(**v) for k, v in data["intensity_stats"].items()}
        return cls(**fields)


def save_plans(plans: Plans, path: str | os.PathLike) -> None:
    write_json(path, plans.to_json())


def load_plans(path: str | os.PathLike) -> Plans:
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(
            f"{path}: no plans found; run `autoseg plan {path.parent.name}` first"
        )
    try:
        plans = Plans.from_json(read_json(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"{path}: not a valid autoseg plans file ({exc}); re-run `autoseg plan`") from exc
    validate_plans_identifiers(plans, path)
    return plans
