"""One case through preprocessing and back: the same code path for training cases and for a new image at
prediction time.

Forward (:func:`preprocess_case`), in the reference's order (reference/nnunet.md "Preprocessing order"):
crop to the nonzero box of all channels -> normalise each channel (before resampling, so the statistics come
from the original voxels) -> resample to the configuration's target spacing -> sample voxel locations per
class for foreground oversampling.

Labels outside the nonzero mask (inside the crop box) are kept as they are. The reference marks background
there as -1 and then treats -1 as background during training; keeping the label is simpler, lets labels stay
valid class indices everywhere, and trains the same.

Inverse (:func:`restore_probabilities`, :func:`restore_segmentation`): resample back to the cropped shape
with the same separate-axis rule, un-crop (background outside the box) and drop the dummy Z of 2D images.
The output lies on the original grid; its geometry is ``properties.geometry`` (origin and direction are
never touched, so nothing is ever reoriented).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

from autoseg.contracts.plans import Configuration, Plans
from autoseg.errors import ConfigurationError, DatasetError
from autoseg.io import Geometry
from autoseg.preprocessing.cropping import bounding_box, crop_to_box, nonzero_mask, uncrop
from autoseg.preprocessing.normalization import normalize_channel
from autoseg.preprocessing.resampling import (
    choose_separate_axis,
    compute_new_shape,
    iter_resampled_slabs,
    resample_channels,
    resample_labels,
    resample_probabilities,
)
from autoseg.preprocessing.store import CaseProperties
from autoseg.preprocessing.transpose import (
    case_order,
    is_identity,
    transpose_array,
    transpose_geometry,
    untranspose_array,
)

# Placeholder spacing of the dummy Z axis of 2D images (the reference's natural-image reader uses 999 too):
# far coarser than any in-plane spacing, so it is always "the" separate axis and never resampled.
DUMMY_Z_SPACING = 999.0
# Foreground oversampling: about 10,000 locations per class, but at least 1 % of the class' voxels
# (reference/nnunet.md "Preprocessing order").
CLASS_LOCATION_SAMPLES = 10_000
CLASS_LOCATION_MIN_FRACTION = 0.01
CLASS_LOCATION_SEED = 1234  # fixed: the same case gives the same stored locations, byte for byte
# Refuse to resample a case to more voxels than this (per channel; 2^31 float32 voxels = 8 GiB). The largest
# real images at their planned spacing are far below (a 1000 x 512 x 512 whole-body CT: 0.26 G voxels), so a
# case above it has a wrong spacing in its header (cm or 100 mm written where mm was meant: one 100 mm-spacing
# image asked for 114 GiB), and failing with that explanation beats dying in the allocation.
MAX_RESAMPLED_VOXELS = 2**31

log = logging.getLogger(__name__)


def _as_3d_spacing(geometry: Geometry) -> list[float]:
    if geometry.dims == 2:
        return [DUMMY_Z_SPACING, *map(float, geometry.spacing)]
    return [float(s) for s in geometry.spacing]


def full_target_spacing(configuration: Configuration, original_spacing: Sequence[float], image_dims: int) -> list[float]:
    """The 3-entry target spacing of a case: 2D configurations and 2D images keep their own Z spacing
    (``original_spacing[0]``); only the in-plane axes go to the configuration's target spacing."""
    target = [float(t) for t in configuration.target_spacing]
    if configuration.dims == 2 or image_dims == 2:
        return [float(original_spacing[0]), *target[-2:]]
    if len(target) != 3:
        raise ConfigurationError(
            f"plans.json: configuration {configuration.name} is 3D but has target spacing {target} "
            "(expected 3 entries); re-run `autoseg plan`"
        )
    return target


def _separate_axis(configuration: Configuration, original_spacing: Sequence[float], target_spacing: Sequence[float],
                   image_dims: int) -> int | None:
    """2D work (2D configurations, 2D images) is always slice by slice across Z; 3D follows the plan's rule."""
    if configuration.dims == 2 or image_dims == 2:
        return 0
    resampling = configuration.resampling
    return choose_separate_axis(original_spacing, target_spacing, resampling.separate_z, resampling.anisotropy_threshold)


def location_key(unit: int | Sequence[int]) -> str:
    """The ``class_locations`` key of a class value (``"2"``) or of a region's values (``"1,2,3"``; a
    one-value region ``"3"`` is the same voxels as class 3, so it shares the key)."""
    if isinstance(unit, (int, np.integer)):
        return str(int(unit))
    return ",".join(str(int(v)) for v in unit)


def _draw_locations(mask: np.ndarray, rng: np.random.Generator, num_samples: int, min_fraction: float) -> list[list[int]]:
    """Sorted ``[z, y, x]`` indices of up to ``num_samples`` True voxels of ``mask``, at least ``min_fraction``
    of them, drawn without replacement."""
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        return []
    count = max(min(num_samples, flat.size), int(math.ceil(flat.size * min_fraction)))
    chosen = np.sort(rng.choice(flat, size=count, replace=False))
    return np.stack(np.unravel_index(chosen, mask.shape), axis=1).tolist()


def sample_class_locations(
    label: np.ndarray,
    classes: Sequence[int | Sequence[int]],
    num_samples: int = CLASS_LOCATION_SAMPLES,
    min_fraction: float = CLASS_LOCATION_MIN_FRACTION,
    seed: int = CLASS_LOCATION_SEED,
) -> dict[str, list[list[int]]]:
    """Up to ``num_samples`` voxel indices ``[z, y, x]`` per class of ``label`` (``[Z, Y, X]``), at least
    ``min_fraction`` of the class' voxels, drawn without replacement with a fixed seed and sorted.

    A class is a label value, or a region: a sequence of values, whose voxels are those holding any of them
    (region datasets sample per region, so a small nested region is oversampled on its own). Keys are
    :func:`location_key` (``"2"``, ``"1,2,3"``); classes absent from the label get an empty list."""
    rng = np.random.default_rng(seed)
    locations: dict[str, list[list[int]]] = {}
    for unit in classes:
        mask = label == unit if isinstance(unit, (int, np.integer)) else np.isin(label, list(unit))
        locations[location_key(unit)] = _draw_locations(mask, rng, num_samples, min_fraction)
    return locations


def sample_annotated_locations(
    label: np.ndarray,
    ignore_value: int,
    num_samples: int = CLASS_LOCATION_SAMPLES,
    min_fraction: float = CLASS_LOCATION_MIN_FRACTION,
    seed: int = CLASS_LOCATION_SEED,
) -> list[list[int]]:
    """Voxel indices ``[z, y, x]`` of annotated voxels (label != ``ignore_value``, background included) of
    ``label`` ``[Z, Y, X]``, drawn as :func:`sample_class_locations` draws a class: a loader centres patches
    on them so that a sparsely annotated case yields patches with something to learn from."""
    rng = np.random.default_rng([seed, 1])  # its own stream: the class locations stay as they were
    return _draw_locations(label != ignore_value, rng, num_samples, min_fraction)


def preprocess_case(
    image: np.ndarray,
    geometry: Geometry,
    plans: Plans,
    configuration: Configuration,
    label: np.ndarray | None = None,
    case_id: str = "",
    source: str = "",
) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """Crop, normalise and resample one case.

    ``image``: float ``[C, (Z,) Y, X]`` as from ``autoseg.io.read_image``; ``label``: integer ``[(Z,) Y, X]``
    (or with a leading channel of 1) or None at prediction time. Returns ``(data float32 [C, Z, Y, X],
    label int8 [1, Z, Y, X] or None, CaseProperties)``; 2D images get Z = 1. ``source``: the image file(s),
    named in warnings and errors (default: ``case_id``).

    Input checks first: NaN/Inf voxels are replaced by the channel's smallest finite value with a warning
    (:func:`replace_non_finite`), and a case whose resampled size would exceed ``MAX_RESAMPLED_VOXELS`` is
    refused before anything is allocated (:func:`check_resampled_size`).
    """
    name = source or case_id or "image"
    if image.ndim != geometry.dims + 1 or tuple(image.shape[1:]) != tuple(geometry.shape):
        raise DatasetError(
            f"{name}: image array {image.shape} does not match its geometry shape {geometry.shape} "
            "(expected [C, *shape]); read images with autoseg.io.read_image"
        )
    if image.shape[0] != plans.num_channels:
        raise DatasetError(
            f"{name}: has {image.shape[0]} channel(s) but the plan expects {plans.num_channels} "
            f"({', '.join(plans.channel_names.values())}); give one file per channel (_0000, _0001, ...)"
        )
    if label is not None:
        label = _checked_label(label, geometry, name)  # before the image work, so bad labels fail fast
    # the plan's axis order first (coarse axis first); all below works in it, properties keep the raw geometry
    order = case_order(plans.transpose_forward, geometry.dims)
    raw_geometry, geometry = geometry, transpose_geometry(geometry, order)
    check_resampled_size(geometry, configuration, name)
    image = replace_non_finite(image, name)
    image, label = transpose_array(image, order), (None if label is None else transpose_array(label, order))

    # crop (mask in the image's own dimensionality, see nonzero_mask), then lift 2D to [C, 1, Y, X]
    mask = nonzero_mask(image)
    box = bounding_box(mask)
    cropped = crop_to_box(image, box)
    mask = crop_to_box(mask, box)
    if geometry.dims == 2:
        box = [[0, 1], *box]
        cropped, mask = cropped[:, None], mask[None]
    original_spacing = _as_3d_spacing(geometry)
    shape_before_crop = [1, *geometry.shape] if geometry.dims == 2 else list(geometry.shape)
    shape_after_crop = list(cropped.shape[1:])

    normalized = np.empty(cropped.shape, dtype=np.float32)
    for channel in range(cropped.shape[0]):
        use_mask = bool(configuration.use_mask_for_norm[channel]) if configuration.use_mask_for_norm else False
        stats = plans.intensity_stats.get(str(channel))
        normalized[channel] = normalize_channel(
            cropped[channel], configuration.normalization[channel], mask if use_mask else None, stats
        )
    del cropped

    target_spacing = full_target_spacing(configuration, original_spacing, geometry.dims)
    new_shape = compute_new_shape(shape_after_crop, original_spacing, target_spacing)
    axis = _separate_axis(configuration, original_spacing, target_spacing, geometry.dims)
    resampling = configuration.resampling
    data = resample_channels(normalized, new_shape, resampling.order_image, axis, resampling.order_z)
    del normalized

    properties = CaseProperties(
        case_id=case_id,
        geometry=raw_geometry,
        original_spacing=original_spacing,
        shape_before_crop=shape_before_crop,
        bbox=[list(map(int, b)) for b in box],
        shape_after_crop=shape_after_crop,
        spacing_after_resampling=target_spacing,
        shape_after_resampling=list(new_shape),
        transpose_forward=order,
    )
    stored_label = None
    if label is not None:
        stored_label = _label_to_grid(label, properties, configuration)
        # one entry per foreground class or region (never background or ignore): what oversampling draws
        scheme = plans.label_scheme
        units = [values if scheme.has_regions else values[0] for _, values in scheme.evaluation_units()]
        properties.class_locations = sample_class_locations(stored_label[0], units)
        if scheme.ignore_value is not None:
            properties.annotated_locations = sample_annotated_locations(stored_label[0], scheme.ignore_value)
    return data, stored_label, properties


def replace_non_finite(image: np.ndarray, name: str) -> np.ndarray:
    """``image`` (``[C, ...]``) with NaN/Inf voxels set to their channel's smallest finite value (0 when the
    channel has none), with one warning naming ``name`` and the count; ``image`` itself when all are finite.
    The minimum, not 0: it is background-like whatever the intensity scale (0 is water in CT, mid-grey in a
    z-scored MRI), so the replaced voxels neither shift the crop box nor look like tissue."""
    finite = np.isfinite(image)
    if finite.all():
        return image
    image = image.copy()
    for channel in range(image.shape[0]):
        bad = ~finite[channel]
        if bad.any():
            good = image[channel][~bad]
            image[channel][bad] = good.min() if good.size else 0.0
    count = int((~finite).sum())
    log.warning("%s: %d NaN/Inf voxel(s) replaced by their channel's minimum finite intensity; fix the file "
                "(`autoseg verify` lists it) to choose the values yourself", name, count)
    return image


def check_resampled_size(geometry: Geometry, configuration: Configuration, name: str) -> None:
    """Refuse (DatasetError) a case that would resample to more than ``MAX_RESAMPLED_VOXELS`` per channel.
    ``geometry``: in the plan's axis order. Uses the uncropped shape: an upper bound, computed in
    microseconds, before the crop, normalisation or resampling allocate anything."""
    spacing = _as_3d_spacing(geometry)
    shape = [1, *geometry.shape] if geometry.dims == 2 else list(geometry.shape)
    target = full_target_spacing(configuration, spacing, geometry.dims)
    new_shape = compute_new_shape(shape, spacing, target)
    voxels = math.prod(int(v) for v in new_shape)
    if voxels > MAX_RESAMPLED_VOXELS:
        shown = geometry.spacing if geometry.dims == 3 else spacing[1:]
        raise DatasetError(
            f"{name}: spacing {tuple(round(float(s), 4) for s in shown)} mm resampled to the target spacing "
            f"{tuple(round(float(t), 4) for t in target[-len(shown):])} mm would have shape {tuple(new_shape)} "
            f"({voxels * 4 / 2**30:.0f} GiB per channel, more than any real image); check the spacing units in "
            "the file's header (millimetres expected) and fix the header"
        )


def _restore_axis(properties: CaseProperties, configuration: Configuration) -> int | None:
    return _separate_axis(
        configuration, properties.original_spacing, properties.spacing_after_resampling, properties.geometry.dims
    )


def _check_preprocessed_shape(array_shape: Sequence[int], properties: CaseProperties, what: str) -> None:
    if list(array_shape) != list(properties.shape_after_resampling):
        raise ValueError(
            f"{properties.case_id or 'case'}: {what} shape {tuple(array_shape)} differs from the preprocessed "
            f"shape {tuple(properties.shape_after_resampling)}"
        )


def restore_probabilities(
    probabilities: np.ndarray, properties: CaseProperties, configuration: Configuration, log_space: bool = True
) -> np.ndarray:
    """Probabilities ``[K, Z, Y, X]`` in preprocessed space -> float32 ``[K, *properties.geometry.shape]`` on
    the original grid: resampled with ``order_probabilities`` (and ``order_z`` on the separate axis), then
    un-cropped with background (class 0) probability 1 outside the box. Interpolated as log-probabilities
    (:func:`~autoseg.preprocessing.resampling.resample_probabilities` says why); ``log_space=False``
    interpolates the probabilities themselves, kept for comparison (benchmarks/export_interpolation.py)."""
    _check_preprocessed_shape(probabilities.shape[1:], properties, "probabilities")
    resampling = configuration.resampling
    resampled = (resample_probabilities if log_space else resample_channels)(
        probabilities,
        properties.shape_after_crop,
        resampling.order_probabilities,
        _restore_axis(properties, configuration),
        resampling.order_z,
    )
    fill = np.zeros(probabilities.shape[0], dtype=np.float32)
    fill[0] = 1.0
    full = uncrop(resampled, properties.bbox, properties.shape_before_crop, fill)
    full = untranspose_array(full, properties.transpose_forward)  # back to the input's own axis order
    return full.reshape((probabilities.shape[0], *properties.geometry.shape))


def restore_segmentation(segmentation: np.ndarray, properties: CaseProperties, configuration: Configuration) -> np.ndarray:
    """Label map ``[Z, Y, X]`` (or ``[1, Z, Y, X]``) in preprocessed space -> ``[*properties.geometry.shape]``
    on the original grid (one-hot resampling with ``order_label``, background outside the crop box).
    Keeps the input's integer dtype."""
    if segmentation.ndim == 4:
        segmentation = segmentation[0]
    _check_preprocessed_shape(segmentation.shape, properties, "segmentation")
    resampling = configuration.resampling
    resampled = resample_labels(
        segmentation,
        properties.shape_after_crop,
        resampling.order_label,
        _restore_axis(properties, configuration),
        resampling.order_z,
    )
    full = uncrop(resampled, properties.bbox, properties.shape_before_crop, 0)
    full = untranspose_array(full, properties.transpose_forward)  # back to the input's own axis order
    return full.reshape(properties.geometry.shape)


# Restoring in slabs: float32 bytes of one slab of all classes (its input rows and its output rows each).
# 256 MiB is 5 rows of a 512 x 512 CT at 50 classes, against 31.5 GB for the whole float32 volume.
RESTORE_SLAB_BYTES = 256 << 20


def segmentation_dtype(num_classes: int) -> type[np.unsignedinteger]:
    """The label map dtype of a prediction: uint8 below 256 classes, else uint16."""
    return np.uint8 if num_classes < 256 else np.uint16


def restore_segmentation_in_slabs(
    log_probabilities: np.ndarray,
    properties: CaseProperties,
    configuration: Configuration,
    probabilities: np.ndarray | None = None,
    slab_bytes: int = RESTORE_SLAB_BYTES,
) -> np.ndarray:
    """Log-probabilities ``[K, Z, Y, X]`` in preprocessed space (any float dtype, e.g. float16) -> label map
    ``[*properties.geometry.shape]`` (:func:`segmentation_dtype`) on the original grid, with bounded memory.

    The same result as ``argmax(restore_probabilities(exp(log_probabilities)))`` (log-space interpolation
    with ``order_probabilities``/``order_z``, background outside the crop box), computed one slab of output
    rows along the first axis at a time (:func:`~autoseg.preprocessing.resampling.iter_resampled_slabs`):
    the argmax of each slab goes straight into the label map. ``slab_bytes`` bounds the float32 output rows of
    a slab and (up to the interpolation's few halo rows) the input rows it needs, each; with the previous
    slab's input rows kept for reuse, about ``3 * slab_bytes`` of float32 are alive at once, never
    ``[K, *original shape]``. Arg-max of the interpolated log-probabilities equals
    the arg-max of their softmax, so no softmax is computed unless ``probabilities`` is given: a writable
    ``[K, *properties.geometry.shape]`` array (e.g. a float16 memory map) that receives the softmax, class 0
    probability 1 outside the crop box, exactly what :func:`restore_probabilities` returns.
    """
    _check_preprocessed_shape(log_probabilities.shape[1:], properties, "log-probabilities")
    num_classes = int(log_probabilities.shape[0])
    full_shape = tuple(int(n) for n in properties.shape_before_crop)
    segmentation = np.zeros(full_shape, dtype=segmentation_dtype(num_classes))  # background outside the box
    (z_lo, z_hi), (y_lo, y_hi), (x_lo, x_hi) = properties.bbox
    if probabilities is not None:
        expected = (num_classes, *properties.geometry.shape)
        if tuple(probabilities.shape) != expected:
            raise ValueError(f"probabilities output has shape {tuple(probabilities.shape)}, expected {expected}")
        if is_identity(properties.transpose_forward):
            probabilities = probabilities.reshape((num_classes, *full_shape))  # 2D images: the dummy Z (a view)
        else:  # a view in the working (transposed) order: the slabs write through it into the raw layout
            probabilities = transpose_array(probabilities, properties.transpose_forward)
        for rows in (slice(0, z_lo), slice(z_hi, full_shape[0])):  # whole rows outside the box
            probabilities[0, rows] = 1
            probabilities[1:, rows] = 0
    row_bytes = 4 * num_classes * int(np.prod(properties.shape_after_crop[1:]))
    # input rows per output row: above 1 where the original grid is coarser along the first axis
    rows_in_per_out = max(1, math.ceil(log_probabilities.shape[1] / properties.shape_after_crop[0]))
    resampling = configuration.resampling
    for start, stop, slab in iter_resampled_slabs(
        log_probabilities,
        properties.shape_after_crop,
        resampling.order_probabilities,
        _restore_axis(properties, configuration),
        resampling.order_z,
        rows_per_slab=max(1, int(slab_bytes) // (row_bytes * rows_in_per_out)),
    ):
        rows = slice(z_lo + start, z_lo + stop)
        segmentation[rows, y_lo:y_hi, x_lo:x_hi] = np.argmax(slab, axis=0)
        if probabilities is None:
            continue
        slab -= slab.max(axis=0, keepdims=True)  # softmax over K in place, as in resample_probabilities
        np.exp(slab, out=slab)
        slab /= slab.sum(axis=0, keepdims=True)
        band = np.zeros((num_classes, stop - start, *full_shape[1:]), dtype=probabilities.dtype)
        band[0] = 1
        band[:, :, y_lo:y_hi, x_lo:x_hi] = slab
        probabilities[:, rows] = band  # each value written once: memory maps stream to disk
    segmentation = untranspose_array(segmentation, properties.transpose_forward)  # back to the input's axis order
    return segmentation.reshape(properties.geometry.shape)


def _checked_label(label: np.ndarray, geometry: Geometry, name: str) -> np.ndarray:
    """``label`` as ``[(Z,) Y, X]`` (a leading channel of 1 dropped), or a clear error when it is not on the
    image's grid or its values cannot be stored as int8 class indices."""
    if label.ndim == geometry.dims + 1 and label.shape[0] == 1:
        label = label[0]
    if tuple(label.shape) != tuple(geometry.shape):
        raise DatasetError(
            f"{name}: label shape {tuple(label.shape)} differs from image shape {tuple(geometry.shape)}; "
            "image and label must share one grid"
        )
    if label.size and (label.min() < 0 or label.max() > 127):
        raise DatasetError(
            f"{name}: label values range {label.min()}..{label.max()}; expected 0..127 "
            "(consecutive integers declared in dataset.json)"
        )
    return label


def _label_to_grid(label: np.ndarray, properties: CaseProperties, configuration: Configuration) -> np.ndarray:
    full = label[None] if properties.geometry.dims == 2 else label  # 2D images: dummy Z
    cropped = crop_to_box(full, properties.bbox).astype(np.int8)
    resampling = configuration.resampling
    resampled = resample_labels(cropped, properties.shape_after_resampling, resampling.order_label,
                                _restore_axis(properties, configuration), resampling.order_z)
    return resampled[None]  # resample_labels keeps int8


def preprocess_label(label: np.ndarray, properties: CaseProperties, configuration: Configuration) -> np.ndarray:
    """A label map on a case's original grid (``[(Z,) Y, X]``) -> int8 ``[1, Z, Y, X]`` on the case's
    preprocessed grid (its stored crop box, then one-hot resampling), exactly as :func:`preprocess_case`
    stores a training label; a cascade maps the previous stage's predictions with it, without the image."""
    label = _checked_label(label, properties.geometry, properties.case_id or "case")
    label = transpose_array(label, properties.transpose_forward)  # raw order -> the case's working order
    return _label_to_grid(label, properties, configuration)
