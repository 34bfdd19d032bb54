"""The planner: from a :class:`Fingerprint` to :class:`Plans` (pure: no files, no printing).

nnU-Net v2's default rules (Isensee et al., Nature Methods 2021; nnunetv2 2.8.1), with the memory estimate measured on the
real network (:mod:`autoseg.planning.memory`) so that every registered architecture is planned the same way.
docs/planning.md lists every rule, where its numbers come from and how to override it.

Configurations: ``2d`` and ``3d_fullres`` (3D data), only ``2d`` for 2D images; ``3d_lowres`` and
``3d_cascade_fullres`` when the full-resolution patch covers less than a quarter of the median image. Every
registered architecture whose supported dimensionalities include a base configuration's gets a variant
``<base>_<arch>``; the default architecture keeps the bare base name. A preset (:mod:`presets`, ``--preset``)
replaces three settings: the architecture of the default configurations, the GPU size and the batch cap.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from autoseg.dataset.labels import LabelScheme
from autoseg.contracts.fingerprint import Fingerprint
from autoseg.contracts.plans import (
    NORM_CT,
    NORM_NONE,
    NORM_RESCALE,
    NORM_RGB,
    NORM_ZSCORE,
    ArchitectureSpec,
    Configuration,
    Plans,
    Resampling,
)
from autoseg.errors import ConfigurationError, reraised_as
from autoseg.planning.memory import batch_size_for_budget, memory_budget_bytes, memory_components
from autoseg.planning.presets import get_preset
from autoseg.planning.spacing import (
    ANISOTROPY_THRESHOLD,
    coarse_axis,
    coarse_axis_first,
    is_anisotropic,
    median_shape_at_spacing,
    target_spacing,
)
from autoseg.planning.topology import Topology, plan_topology

logger = logging.getLogger(__name__)

DEFAULT_ARCHITECTURE = "unet"  # the plain U-Net keeps the bare configuration names (design.md section 3)
# nnunet.md: nnU-Net's reference GPU size; the same number as autoseg.device.DEFAULT_GPU_MEMORY_GB, not imported
# from there because device imports torch and preprocessing workers import this module
DEFAULT_GPU_MEMORY_GB = 8.0
BASE_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")

# nnunet.md: initial patch of 256^3 voxels (3D) / 2048^2 pixels (2D), shaped like the physical extent
INITIAL_PATCH_VOXELS = {3: 256**3, 2: 2048**2}
# nnunet.md: the patch must fit at the reference batch (3D 2, 2D 12), the batch size never goes below 2 and
# one batch covers at most 5 % of the dataset's voxels
REFERENCE_BATCH = {3: 2, 2: 12}
MIN_BATCH_SIZE = 2
MIN_STAGES = 2  # a U-Net needs at least one downsampling; the patch never shrinks below that
MAX_DATASET_FRACTION_PER_BATCH = 0.05
# nnunet.md: 3d_lowres only when the full-res patch covers < 25 % of the median image; spacing grows by
# 3 % per step (anisotropic axes first until within 2x); dropped unless the low-res image is >= 2x smaller
LOWRES_COVERAGE_THRESHOLD = 0.25
LOWRES_SPACING_STEP = 1.03
LOWRES_MIN_SHRINK = 2.0
# nnunet.md: z-score inside the nonzero mask when cropping removed more than a quarter of the median image
MASK_FOR_NORM_THRESHOLD = 0.75

_CT_NAMES = {"ct"}
_NO_NORM_NAMES = {"nonorm", "no_norm", "none"}
_RESCALE_NAMES = {"rescale_to_0_1", "rescale_0_1"}
_RGB_NAMES = {"rgb_to_0_1", "rgb_0_1"}
_COLOUR_CHANNEL_NAMES = {"r", "g", "b", "red", "green", "blue", "rgb"}
_NATURAL_IMAGE_ENDINGS = {".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff"}


# ------------------------------------------------------------------------------------- normalisation
def normalization_scheme(channel_name: str, file_ending: str) -> str:
    """Scheme for one channel from its ``dataset.json`` name.

    "CT" -> ``ct``; nnU-Net's explicit names (noNorm, rescale_to_0_1, rgb_to_0_1) -> their scheme; colour
    channels (R, G, B, red, ...) of natural images (PNG, BMP, JPEG, TIFF: 8-bit, 0..255) -> ``rgb_0_1``;
    anything else -> per-image ``zscore``.
    """
    name = channel_name.strip().lower()
    if name in _CT_NAMES:
        return NORM_CT
    if name in _NO_NORM_NAMES:
        return NORM_NONE
    if name in _RESCALE_NAMES:
        return NORM_RESCALE
    if name in _RGB_NAMES:
        return NORM_RGB
    if name in _COLOUR_CHANNEL_NAMES and file_ending.lower() in _NATURAL_IMAGE_ENDINGS:
        return NORM_RGB
    return NORM_ZSCORE


def choose_normalization(
    channel_names: dict[str, str], file_ending: str, median_relative_size_after_crop: float
) -> tuple[list[str], list[bool]]:
    """Per channel (in channel order): the scheme and whether z-scoring uses the nonzero mask.

    The mask is used only by z-score, and only when cropping to the nonzero region removed a large part of
    the median image (relative size < 3/4): then the zero background would dominate the image statistics.
    """
    use_mask = median_relative_size_after_crop < MASK_FOR_NORM_THRESHOLD
    schemes = [normalization_scheme(channel_names[k], file_ending) for k in sorted(channel_names, key=int)]
    return schemes, [use_mask and s == NORM_ZSCORE for s in schemes]


# -------------------------------------------------------------------------------------- patch search
def initial_patch(spacing: Sequence[float], median_shape: Sequence[float]) -> list[float]:
    """Start patch (voxels, array order): ``INITIAL_PATCH_VOXELS[dims]`` voxels shaped like ``1/spacing`` (so
    its physical extent is isotropic), clipped to the median image shape (which may be fractional)."""
    dims = len(spacing)
    inverse = 1.0 / np.asarray(spacing, dtype=np.float64)
    scale = (INITIAL_PATCH_VOXELS[dims] / np.prod(inverse)) ** (1.0 / dims)
    start = np.round(inverse * scale)
    return [float(min(s, m)) for s, m in zip(start, median_shape)]


@dataclass
class NetworkPlan:
    """Outcome of the patch/batch search for one architecture at one resolution."""

    architecture: str
    topology: Topology
    patch_size: tuple[int, ...]
    batch_size: int
    memory_bytes: int
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _Search:
    """The pieces of the patch search that depend on the architecture (all through the registry, whose
    NetworkError becomes the planner's ConfigurationError here)."""

    def __init__(self, architecture: str, spacing: Sequence[float], in_channels: int, num_classes: int,
                 options: dict[str, Any]) -> None:
        from autoseg import networks

        self.networks = networks
        self.architecture = architecture
        self.spacing = [float(s) for s in spacing]
        self.dims = len(spacing)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.options = options
        # the registry decides which build options its constraint/divisor functions read
        with reraised_as(ConfigurationError, networks.NetworkError):
            self.constraint_options = networks.constraint_options(architecture, options)

    def accepted(self, patch: Sequence[float]) -> tuple[Topology, tuple[int, ...]]:
        """Topology for ``patch`` and the nearest patch the architecture accepts with it."""
        topology = plan_topology(self.spacing, patch)
        with reraised_as(ConfigurationError, self.networks.NetworkError):
            adjusted = self.networks.adjust_patch(
                self.architecture, topology.patch_size, topology.strides, self.dims, **self.constraint_options
            )
        if tuple(adjusted) != topology.patch_size:
            topology = replace(topology, patch_size=tuple(int(p) for p in adjusted))
        return topology, topology.patch_size

    def divisor(self, topology: Topology) -> tuple[int, ...]:
        with reraised_as(ConfigurationError, self.networks.NetworkError):
            return self.networks.patch_divisor(
                self.architecture, topology.strides, self.dims, **self.constraint_options
            )

    def memory(self, topology: Topology) -> tuple[int, int]:
        # traced with deep supervision on, as every configuration is planned (and trained) with it
        with reraised_as(ConfigurationError, self.networks.NetworkError):
            spec = self.networks.NetworkSpec(
                self.architecture, self.in_channels, self.num_classes, topology.patch_size, topology.strides,
                topology.kernel_sizes, topology.features, deep_supervision=True, options=self.options,
            )
            return memory_components(spec)


def _shrink_order(patch: Sequence[int], median_shape: Sequence[float]) -> list[int]:
    """Axes by decreasing patch/median-shape ratio; on ties the later axis first (nnU-Net's choice)."""
    ratios = [p / max(m, 1.0) for p, m in zip(patch, median_shape)]
    return sorted(range(len(patch)), key=lambda a: (-ratios[a], -a))


def _shrink(
    search: _Search, topology: Topology, patch: tuple[int, ...], median_shape: Sequence[float]
) -> tuple[Topology, tuple[int, ...]] | None:
    """The next smaller patch: the axis with the largest patch/median ratio loses one divisibility step
    (the step of the shrunken patch, which may have lost a downsampling on that axis); None at the minimum."""
    for axis in _shrink_order(patch, median_shape):
        trial = list(patch)
        trial[axis] -= search.divisor(topology)[axis]
        if trial[axis] < 1:
            continue
        step = search.divisor(plan_topology(search.spacing, trial))[axis]
        # An architecture whose own divisor is finer than the U-Net topology's padding (e.g. unet2022: 32
        # against 2^7 = 128 for seven poolings) gets its one-step-smaller patch padded straight back up;
        # take more steps until the accepted patch really shrinks. Never below one step, though: an axis cut
        # to a remainder smaller than its divisor loses its downsampling and comes back as a sliver (UNETR++
        # at a tiny budget went from 32x64x32 to 32x2x32); at that point this axis cannot shrink.
        step = max(step, 1)
        for steps in range(1, patch[axis] // step + 1):
            candidate = list(patch)
            candidate[axis] = patch[axis] - steps * step
            if candidate[axis] < step:
                break
            new_topology, new_patch = search.accepted(candidate)
            if math.prod(new_patch) < math.prod(patch):
                return new_topology, new_patch
    return None


def plan_network(
    architecture: str,
    spacing: Sequence[float],
    median_shape: Sequence[float],
    in_channels: int,
    num_classes: int,
    gpu_memory_gb: float,
    dataset_voxels: float,
    patch_size: Sequence[int] | None = None,
    options: dict[str, Any] | None = None,
    max_steps: int = 500,
    max_dataset_fraction: float = MAX_DATASET_FRACTION_PER_BATCH,
) -> NetworkPlan:
    """Patch, topology and batch size of ``architecture`` at ``spacing`` (mm) for images of ``median_shape``
    (voxels at that spacing), within ``gpu_memory_gb``.

    Start from :func:`initial_patch` (or the forced ``patch_size``, then no shrinking); while the estimate at
    the reference batch exceeds the budget, shrink the axis with the largest patch/median ratio by one
    divisibility step and re-derive the topology. The batch is what the remaining budget holds, capped so a
    batch covers at most ``max_dataset_fraction`` (5 %; a preset may lift it) of ``dataset_voxels``, and at
    least 2.
    """
    dims = len(spacing)
    options = dict(options or {})
    search = _Search(architecture, spacing, in_channels, num_classes, options)
    budget = memory_budget_bytes(gpu_memory_gb)
    reference_batch = REFERENCE_BATCH[dims]
    notes: list[str] = []

    if patch_size is not None:
        if len(patch_size) != dims:
            raise ConfigurationError(
                f"--patch-size {list(patch_size)} has {len(patch_size)} axes but the {dims}D configuration "
                f"needs {dims}; give {dims} numbers in array order"
            )
        topology, patch = search.accepted([float(p) for p in patch_size])
        if tuple(patch) != tuple(int(p) for p in patch_size):
            notes.append(f"patch {list(patch_size)} given; adjusted to {list(patch)} for {architecture}")
        else:
            notes.append(f"patch {list(patch)} given by the user")
        per_sample, fixed = search.memory(topology)
    else:
        # The shrink sequence depends only on the patch/median ratios, not on memory: list it first, then
        # find the first patch that fits by bisection (memory falls as the patch shrinks), which traces the
        # network ~log2(steps) times instead of once per step.
        sequence = [search.accepted(initial_patch(spacing, median_shape))]
        while len(sequence) < max_steps:
            following = _shrink(search, *sequence[-1], median_shape)
            if following is None or following[0].num_stages < MIN_STAGES:
                break
            sequence.append(following)

        def fits(index: int) -> bool:
            per, fix = search.memory(sequence[index][0])
            return fix + reference_batch * per <= budget

        if fits(0):
            chosen = 0
        elif not fits(len(sequence) - 1):
            chosen = len(sequence) - 1
            notes.append(f"no smaller patch is possible; {list(sequence[-1][1])} exceeds the budget")
        else:
            low, high = 0, len(sequence) - 1  # fits(low) is False, fits(high) is True
            while high - low > 1:
                middle = (low + high) // 2
                if fits(middle):
                    high = middle
                else:
                    low = middle
            chosen = high
        topology, patch = sequence[chosen]
        per_sample, fixed = search.memory(topology)
        if chosen:
            notes.append(
                f"patch shrunk from {list(sequence[0][1])} to {list(patch)} to fit {gpu_memory_gb:g} GB "
                f"at batch {reference_batch}"
            )

    fitting = batch_size_for_budget(per_sample, fixed, budget)
    cap = int(round(dataset_voxels * max_dataset_fraction / math.prod(patch)))
    batch = max(min(fitting, cap), MIN_BATCH_SIZE)
    if batch < fitting:
        notes.append(
            f"batch {fitting} capped at {batch}: one batch covers at most {100 * max_dataset_fraction:g} % of the "
            "dataset's voxels"
        )
    if fitting < MIN_BATCH_SIZE:
        notes.append(f"batch {MIN_BATCH_SIZE} (the minimum) exceeds the {gpu_memory_gb:g} GB budget")
    return NetworkPlan(architecture, topology, tuple(patch), batch, fixed + batch * per_sample, options, notes)


# -------------------------------------------------------------------------------------- configurations
@dataclass
class _Base:
    """A data resolution shared by the configurations planned on it."""

    name: str
    data_identifier: str
    spacing: list[float]
    median_shape: list[float]
    dataset_voxels: float
    resampling: Resampling
    notes: list[str]


def _resampling(spacing: Sequence[float]) -> Resampling:
    """Resample the coarse axis on its own (nearest) when the target spacing is anisotropic; otherwise
    leave the choice to each case's own spacing (None), as nnU-Net decides per case."""
    if len(spacing) == 3 and is_anisotropic(spacing, ANISOTROPY_THRESHOLD):
        return Resampling(separate_z=True, coarse_axis=coarse_axis(spacing))
    return Resampling()


def _lowres_spacing(fullres_spacing: np.ndarray, steps: int) -> np.ndarray:
    """Spacing after ``steps`` increases: axes more than 2x finer than the coarsest grow alone first."""
    spacing = fullres_spacing.astype(np.float64).copy()
    for _ in range(steps):
        finer = spacing.max() / spacing > 2
        if finer.any():
            spacing[finer] *= LOWRES_SPACING_STEP
        else:
            spacing *= LOWRES_SPACING_STEP
    return spacing


def _plan_lowres(
    fullres: NetworkPlan, fullres_spacing: np.ndarray, fullres_median: np.ndarray, num_cases: int,
    in_channels: int, num_classes: int, gpu_memory_gb: float, max_steps: int = 400,
    max_dataset_fraction: float = MAX_DATASET_FRACTION_PER_BATCH,
) -> tuple[np.ndarray, np.ndarray, NetworkPlan] | None:
    """The smallest spacing increase (in 3 % steps) at which the patch of ``fullres``'s architecture (the
    default one: the plain U-Net, or a preset's) covers >= 25 % of the median image, or None when full
    resolution already covers that much or low resolution saves < 2x."""
    coverage = math.prod(fullres.patch_size) / float(np.prod(fullres_median))
    if coverage >= LOWRES_COVERAGE_THRESHOLD:
        return None
    cache: dict[int, tuple[np.ndarray, np.ndarray, NetworkPlan, float]] = {}

    def at(steps: int) -> tuple[np.ndarray, np.ndarray, NetworkPlan, float]:
        if steps not in cache:
            spacing = _lowres_spacing(fullres_spacing, steps)
            median = np.round(fullres_spacing / spacing * fullres_median)
            plan = plan_network(
                fullres.architecture, spacing.tolist(), median.tolist(), in_channels, num_classes,
                gpu_memory_gb, float(np.prod(median)) * num_cases, options=fullres.options,
                max_dataset_fraction=max_dataset_fraction,
            )
            cache[steps] = (spacing, median, plan, math.prod(plan.patch_size) / float(np.prod(median)))
        return cache[steps]

    # coverage grows with the spacing: find the first step count that reaches the threshold by doubling,
    # then bisection (the same answer as stepping 3 % at a time, in ~2 log2(steps) plans instead of steps)
    low, high = 0, 1
    while at(high)[3] < LOWRES_COVERAGE_THRESHOLD:
        low, high = high, high * 2
        if high > max_steps:
            logger.warning("3d_lowres: no spacing within %d steps reaches 25 %% coverage", max_steps)
            return None
    while high - low > 1:
        middle = (low + high) // 2
        if at(middle)[3] >= LOWRES_COVERAGE_THRESHOLD:
            high = middle
        else:
            low = middle
    spacing, median, plan, _ = at(high)
    if float(np.prod(fullres_median)) / float(np.prod(median)) < LOWRES_MIN_SHRINK:
        return None
    return spacing, median, plan


def _architectures(requested: Sequence[str] | None) -> list[str]:
    from autoseg import networks

    if requested is None:
        return networks.available()
    for name in requested:
        with reraised_as(ConfigurationError, networks.NetworkError):
            networks.get(name)  # ConfigurationError listing the choices for unknown names
    return list(dict.fromkeys(requested))


def _configuration_name(base: str, architecture: str) -> str:
    return base if architecture == DEFAULT_ARCHITECTURE else f"{base}_{architecture}"


def plan_from_fingerprint(
    fingerprint: Fingerprint,
    gpu_memory_gb: float | None = None,
    configurations: Sequence[str] | None = None,
    architectures: Sequence[str] | None = None,
    patch_size: Sequence[int] | None = None,
    preset: str | None = None,
) -> Plans:
    """Plans for a fingerprinted dataset. ``gpu_memory_gb``: GPU size (GiB; None: the preset's, else 8);
    ``configurations``: base names to plan (default: all that apply); ``architectures``: registry names
    (default: every registered one); ``patch_size``: force this patch on every configuration with as many
    axes; ``preset``: a name in :data:`autoseg.planning.presets.PRESETS`. A preset's architecture becomes the
    default one (its configurations are the defaults and judge the 3d_lowres rule) and is the only one planned
    unless ``architectures`` adds others; its batch cap applies to every configuration; an explicit
    ``gpu_memory_gb`` wins over its GPU size (docs/planning.md, "Presets")."""
    from autoseg import networks

    chosen_preset = get_preset(preset) if preset is not None else None
    default_architecture = DEFAULT_ARCHITECTURE
    max_dataset_fraction = MAX_DATASET_FRACTION_PER_BATCH
    if chosen_preset is not None:
        default_architecture = chosen_preset.architecture
        max_dataset_fraction = chosen_preset.max_dataset_fraction_per_batch
        architectures = [chosen_preset.architecture, *(architectures or [])]
    if gpu_memory_gb is None:
        gpu_memory_gb = chosen_preset.gpu_memory_gb if chosen_preset is not None else DEFAULT_GPU_MEMORY_GB
    if gpu_memory_gb <= 0:
        raise ConfigurationError(f"--gpu-memory must be positive, got {gpu_memory_gb}; give the GPU size in GB")
    if configurations is not None:
        unknown = [c for c in configurations if c not in BASE_CONFIGURATIONS]
        if unknown:
            raise ConfigurationError(
                f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(BASE_CONFIGURATIONS)} "
                "(architecture variants are chosen with --arch)"
            )
    wanted = set(configurations) if configurations is not None else set(BASE_CONFIGURATIONS)
    arch_names = _architectures(architectures)
    dims = fingerprint.dims
    in_channels = len(fingerprint.channel_names)
    # network outputs (regions: one each; an ignore label is none), for the memory estimate
    num_classes = LabelScheme.from_labels(fingerprint.labels, fingerprint.regions_class_order,
                                          fingerprint.label_order).num_outputs
    # every rule below works in the transposed order (coarse axis first); the fingerprint stays in raw order
    transpose_forward = coarse_axis_first(fingerprint.median_spacing)
    spacings, shapes = fingerprint.spacings[:, transpose_forward], fingerprint.shapes_after_crop[:, transpose_forward]
    num_cases = fingerprint.num_cases
    schemes, masks = choose_normalization(
        fingerprint.channel_names, fingerprint.file_ending, fingerprint.median_relative_size_after_crop
    )

    fullres_spacing = target_spacing(spacings, shapes) if dims == 3 else np.median(spacings, axis=0)
    fullres_median = median_shape_at_spacing(spacings, shapes, fullres_spacing)
    dataset_voxels = float(np.prod(fullres_median)) * num_cases
    spacing_note = "target spacing: median per axis"
    median_spacing = np.median(spacings, axis=0)
    if not np.allclose(fullres_spacing, median_spacing):
        axis = coarse_axis(median_spacing)
        spacing_note = (
            f"anisotropic: axis {axis} uses the 10th percentile of its spacings ({fullres_spacing[axis]:.4g} mm "
            f"instead of the median {median_spacing[axis]:.4g} mm)"
        )
    if transpose_forward != sorted(transpose_forward):
        spacing_note += f"; raw axes transposed {transpose_forward} so the coarse axis comes first"

    base_2d = base_fullres = None
    if dims == 2:
        if wanted - {"2d"} and configurations is not None:
            raise ConfigurationError(
                f"{fingerprint.dataset_name}: the images are 2D, so only the 2d configuration exists; "
                f"asked for {', '.join(sorted(wanted - {'2d'}))}. Drop --configs or use --configs 2d"
            )
        base_2d = _Base("2d", "2d", fullres_spacing.tolist(), fullres_median.tolist(), dataset_voxels,
                        Resampling(), [spacing_note, "2D images: only the 2d configuration applies"])
    else:
        base_2d = _Base("2d", "2d", fullres_spacing[1:].tolist(), fullres_median[1:].tolist(), dataset_voxels,
                        Resampling(), ["in-plane part of the 3d_fullres spacing; slices keep their own Z spacing"])
        base_fullres = _Base("3d_fullres", "3d_fullres", fullres_spacing.tolist(), fullres_median.tolist(),
                             dataset_voxels, _resampling(fullres_spacing), [spacing_note])

    cache: dict[tuple[str, str], NetworkPlan | str] = {}

    def plan_for(base: _Base, architecture: str) -> NetworkPlan | str:
        """The plan, or a one-line reason why ``architecture`` cannot be planned at this resolution."""
        key = (base.name, architecture)
        if key not in cache:
            forced = patch_size if patch_size is not None and len(patch_size) == len(base.spacing) else None
            try:
                cache[key] = plan_network(
                    architecture, base.spacing, base.median_shape, in_channels, num_classes, gpu_memory_gb,
                    base.dataset_voxels, patch_size=forced,
                    options=dict(networks.get(architecture).default_options),
                    max_dataset_fraction=max_dataset_fraction,
                )
            except ConfigurationError as exc:  # the architecture's declared constraints cannot be met
                cache[key] = _one_line(exc)
            except Exception as exc:  # noqa: BLE001
                # A network that fails its memory trace breaks a promise of its constraint function (a bug,
                # caught by tests/planning/test_sweep.py for the registered ones). One architecture must not
                # stop the others from being planned: report it in one line, the traceback goes to --debug.
                logger.debug("memory trace of %s failed", architecture, exc_info=True)
                cache[key] = f"its memory trace failed ({type(exc).__name__}: {_one_line(exc)}); please report this"
        return cache[key]

    # (configuration base name, data resolution, previous stage base name)
    emits: list[tuple[str, _Base, str | None]] = []
    if "2d" in wanted:
        emits.append(("2d", base_2d, None))
    if base_fullres is not None and "3d_fullres" in wanted:
        emits.append(("3d_fullres", base_fullres, None))
    if base_fullres is not None and {"3d_lowres", "3d_cascade_fullres"} & wanted:
        # the 25 % rule is judged on the default architecture's own (memory-limited) full-resolution patch:
        # the plain U-Net's, or a preset's architecture's
        fullres_default = plan_network(
            default_architecture, base_fullres.spacing, base_fullres.median_shape, in_channels, num_classes,
            gpu_memory_gb, dataset_voxels, options=dict(networks.get(default_architecture).default_options),
            max_dataset_fraction=max_dataset_fraction,
        )
        lowres = _plan_lowres(fullres_default, fullres_spacing, fullres_median, num_cases, in_channels,
                              num_classes, gpu_memory_gb, max_dataset_fraction=max_dataset_fraction)
        if lowres is None:
            if configurations is not None:
                logger.warning(
                    "3d_lowres/3d_cascade_fullres not planned: the 3d_fullres patch covers >= %d %% of the "
                    "median image, or a lower resolution would not be >= 2x smaller",
                    int(LOWRES_COVERAGE_THRESHOLD * 100),
                )
        else:
            spacing, median, plan = lowres
            coverage = 100 * math.prod(fullres_default.patch_size) / float(np.prod(fullres_median))
            base_lowres = _Base(
                "3d_lowres", "3d_lowres", spacing.tolist(), median.tolist(), float(np.prod(median)) * num_cases,
                _resampling(spacing),
                [f"the 3d_fullres patch covers {coverage:.1f} % of the median image (< 25 %): low resolution planned"],
            )
            if patch_size is None:
                cache[("3d_lowres", default_architecture)] = plan
            if "3d_lowres" in wanted:
                emits.append(("3d_lowres", base_lowres, None))
            if "3d_cascade_fullres" in wanted:
                emits.append(("3d_cascade_fullres", base_fullres, "3d_lowres"))

    result: dict[str, Configuration] = {}
    skipped: dict[str, str] = {}
    emitted_archs: set[str] = set()
    for base_name, base, previous_base in emits:
        base_dims = len(base.spacing)
        for architecture in arch_names:
            if base_dims not in networks.get(architecture).dims:
                continue  # the registry says which dimensionalities an architecture supports
            name = _configuration_name(base_name, architecture)
            plan = plan_for(base, architecture)
            if isinstance(plan, str):
                where = (
                    f"{fingerprint.dataset_name} {base_name} (median image {_shape_text(base.median_shape)} voxels "
                    f"at {_shape_text(base.spacing, '.3g')} mm, {gpu_memory_gb:g} GB)"
                )
                if architectures is not None:  # asked for by name: the user must hear why, and what to do
                    raise ConfigurationError(
                        f"architecture {architecture!r} cannot be planned for {where}: {plan}. Fix: give a patch it "
                        f"accepts with --patch-size (docs/architectures.md lists its constraints), or drop "
                        f"{architecture} from --arch"
                    )
                skipped[name] = plan
                logger.warning("%s not planned for %s: %s", name, where, plan)
                continue
            emitted_archs.add(architecture)
            previous = _configuration_name(previous_base, architecture) if previous_base else None
            notes = list(base.notes) + plan.notes
            if chosen_preset is not None:
                notes.append(f"preset {chosen_preset.name}: {chosen_preset.description}")
            if previous is not None:
                notes.append(f"cascade: the one-hot predictions of {previous} become extra input channels")
            result[name] = Configuration(
                name=name,
                data_identifier=base.data_identifier,
                dims=base_dims,
                target_spacing=[float(s) for s in base.spacing],
                patch_size=[int(p) for p in plan.patch_size],
                batch_size=int(plan.batch_size),
                median_shape=[float(m) for m in base.median_shape],
                normalization=list(schemes),
                use_mask_for_norm=list(masks),
                resampling=replace(base.resampling),
                architecture=ArchitectureSpec(
                    name=architecture,
                    patch_size=[int(p) for p in plan.patch_size],
                    strides=[list(s) for s in plan.topology.strides],
                    kernel_sizes=[list(k) for k in plan.topology.kernel_sizes],
                    features=list(plan.topology.features),
                    deep_supervision=True,
                    options=dict(plan.options),
                ),
                memory_estimate_bytes=int(plan.memory_bytes),
                previous_stage=previous,
                notes=notes,
            )
    if architectures is not None:
        missing = [a for a in arch_names if a not in emitted_archs]
        if missing:
            planned_dims = sorted({len(b.spacing) for _, b, _ in emits})
            raise ConfigurationError(
                f"architecture(s) {', '.join(missing)} do not apply to the planned configurations "
                f"({', '.join(f'{d}D' for d in planned_dims)}); pick from "
                f"{', '.join(a for a in networks.available() if set(networks.get(a).dims) & set(planned_dims))}"
            )
    if not result:
        reasons = "".join(f"; {name}: {reason}" for name, reason in sorted(skipped.items()))
        raise ConfigurationError(
            f"{fingerprint.dataset_name}: nothing to plan for configurations {sorted(wanted)} and architectures "
            f"{arch_names}{reasons}; drop --configs/--arch to plan the defaults"
        )
    defaults = [
        name for name in (_configuration_name(base, default_architecture)
                          for base in ("2d", "3d_fullres", "3d_cascade_fullres"))
        if name in result
    ]
    return Plans(
        dataset_name=fingerprint.dataset_name,
        channel_names=dict(fingerprint.channel_names),
        labels=dict(fingerprint.labels),
        regions_class_order=None if fingerprint.regions_class_order is None else list(fingerprint.regions_class_order),
        label_order=None if fingerprint.label_order is None else list(fingerprint.label_order),
        file_ending=fingerprint.file_ending,
        configurations=dict(sorted(result.items())),
        default_configurations=defaults,
        intensity_stats={k: replace(v) for k, v in fingerprint.intensity_stats.items()},
        median_spacing=[float(s) for s in fingerprint.median_spacing],
        median_shape=[float(s) for s in fingerprint.median_shape_after_crop],
        gpu_memory_gb=float(gpu_memory_gb),
        transpose_forward=list(transpose_forward),
        skipped=dict(sorted(skipped.items())),
        preset=chosen_preset.name if chosen_preset is not None else None,
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _shape_text(values: Sequence[float], spec: str = ".0f") -> str:
    return "x".join(format(float(v), spec) for v in values)


# ----------------------------------------------------------------------------------------- summary
def format_plans_table(plans: Plans) -> str:
    """A human-readable table of the configurations (name, arch, dims, spacing, patch, batch, memory), then
    one line per configuration left out, with its reason."""
    header = ("configuration", "arch", "dims", "spacing (mm)", "patch", "batch", "memory (GB)")
    rows = [header]
    for name, config in plans.configurations.items():
        rows.append((
            name + (" *" if name in plans.default_configurations else ""),
            config.architecture.name,
            f"{config.dims}D",
            "x".join(f"{s:.3g}" for s in config.target_spacing),
            "x".join(str(p) for p in config.patch_size),
            str(config.batch_size),
            f"{config.memory_estimate_bytes / 1e9:.2f}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"* default configurations; memory budget {plans.gpu_memory_gb:g} GB")
    if plans.preset is not None:
        lines.append(f"preset {plans.preset}")
    if plans.transpose_forward != sorted(plans.transpose_forward):
        lines.append(f"raw array axes transposed {plans.transpose_forward}: spacing and patch are in that order")
    for name, reason in plans.skipped.items():
        lines.append(f"not planned: {name}: {reason}")
    return "\n".join(lines)
