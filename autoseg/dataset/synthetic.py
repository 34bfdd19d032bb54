"""A seeded synthetic dataset generator for tests and `autoseg demo`.

Each case is a smooth "body" with two touching objects: an ellipsoid (label 1) and a smaller blob beside it
(label 2), on a noisy, bias-field-modulated background. Shapes, spacing, positions and intensities vary per
case; case ``i`` depends only on ``(seed, i)``. 2D datasets are written as PNG (optionally RGB) or NIfTI;
3D datasets as NIfTI with anisotropic spacing and, if asked, a rotated direction and a non-zero origin.

Two more kinds (``SyntheticSpec.kind``) exercise the other dataset.json label forms (docs/datasets.md):

- ``"regions"``: a BraTS-like nested lesion: value 1 (outer shell), 2 (inner part) and 3 (innermost core),
  declared as the regions ``whole`` [1, 2, 3], ``core`` [2, 3] and ``enhancing`` [3] with
  ``regions_class_order`` [1, 2, 3]; every channel shows the three values with its own contrast (use
  ``channels=4`` for the BraTS channel count).
- ``"sparse"``: the two objects of the default kind, but only every ``annotated_every``-th slice along the
  first axis is annotated; the other voxels are ``ignore`` (value 3). The dense truth of every training
  case is kept beside it in ``labelsTr_dense/``, to score predictions against.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from autoseg.dataset.cases import IMAGES_TEST, IMAGES_TRAIN, LABELS_TRAIN
from autoseg.dataset.spec import DATASET_JSON, write_dataset_json
from autoseg.io import Geometry, write_image, write_segmentation

LABELS = {"background": 0, "object": 1, "satellite": 2}
# kind "regions": key order is region order (whole, core, enhancing), painted 1, 2, 3 (nested: last wins)
REGION_LABELS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]}
REGIONS_CLASS_ORDER = [1, 2, 3]
# kind "sparse": the default classes plus the ignore label (highest value + 1)
SPARSE_LABELS = {**LABELS, "ignore": 3}
DENSE_LABELS_FOLDER = "labelsTr_dense"
KINDS = ("labels", "regions", "sparse")


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. ``shape`` and ``spacing`` are means in array order; each case varies by +-15 %/10 %."""

    num_cases: int = 10
    num_test: int = 0
    dims: int = 3
    shape: tuple[int, ...] = (24, 48, 48)
    spacing: tuple[float, ...] = (2.5, 0.8, 0.8)
    channels: int = 1
    modality: str = "MRI"  # "MRI" or "CT" (selects dataset.json channel name and intensity range)
    rgb: bool = False  # 2D only: one colour PNG per case holding 3 channels (natural-image convention)
    file_ending: str = ".nii.gz"
    oblique: bool = False  # rotated direction cosines and a non-zero origin, to exercise geometry handling
    seed: int = 0
    kind: str = "labels"  # "labels", "regions" (nested regions) or "sparse" (ignore label), see the module doc
    annotated_every: int = 3  # kind "sparse": one annotated slice (first axis) in this many


def _rotation(seed: int, dims: int) -> tuple[float, ...]:
    rng = np.random.default_rng([seed, 9999])
    angle = rng.uniform(0.2, 0.6)
    c, s = np.cos(angle), np.sin(angle)
    if dims == 2:
        return (c, -s, s, c)
    return tuple(np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).ravel().tolist())


def make_case(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One case: image ``[C, *shape]`` float32, label ``shape`` uint8 and its geometry."""
    rng = np.random.default_rng([spec.seed, index])
    shape = tuple(max(8, int(round(s * rng.uniform(0.85, 1.15)))) for s in spec.shape)
    spacing = tuple(float(s * rng.uniform(0.9, 1.1)) for s in spec.spacing)
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * sp for n, sp in zip(shape, spacing)], indexing="ij")
    extent = [n * sp for n, sp in zip(shape, spacing)]

    radius = [e * rng.uniform(0.15, 0.22) for e in extent]
    centre = [e * rng.uniform(0.4, 0.6) for e in extent]
    d1 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radius))
    offset = rng.uniform(1.2, 1.5)
    centre2 = list(centre)
    centre2[-1] = centre[-1] + radius[-1] * offset
    radius2 = [r * rng.uniform(0.55, 0.7) for r in radius]
    d2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre2, radius2))
    label = np.zeros(shape, np.uint8)
    if spec.kind == "regions":  # nested shells of one lesion (a BraTS tumour: oedema, core, enhancing)
        label[d1 < 1.0] = 1
        label[d1 < 0.45] = 2
        label[d1 < 0.15] = 3
    else:
        label[d2 < 1.0] = 2
        label[d1 < 1.0] = 1

    body = sum(((g - e / 2) / (e * 0.47)) ** 2 for g, e in zip(grids[-2:], extent[-2:])) < 1.0
    sigma = tuple(4.0 / sp for sp in spacing)
    channels = 3 if spec.rgb else spec.channels
    images = []
    for channel in range(channels):
        if spec.modality.upper() == "CT":
            background, tissue, obj, sat, noise = -1000.0, 40.0, 160.0, -40.0, 15.0
        else:
            scale = rng.uniform(0.7, 1.4)  # MRI intensities have no absolute scale
            background, tissue, noise = 0.0, 300.0 * scale, 20.0 * scale
            obj, sat = tissue + 200.0 * scale * (1 if channel % 2 == 0 else -0.5), tissue - 120.0 * scale
        smooth = gaussian_filter(rng.normal(0, 1, shape), sigma)
        smooth *= 25.0 / (smooth.std() + 1e-8)
        image = np.where(body, tissue, background) + smooth * body
        image[label == 1] = obj + smooth[label == 1] * 0.5
        image[label == 2] = sat + smooth[label == 2] * 0.5
        if spec.kind == "regions":  # the innermost value: bright in even channels, dark in odd ones
            image[label == 3] = tissue + (350.0 if channel % 2 == 0 else -250.0) + smooth[label == 3] * 0.5
        image = gaussian_filter(image, 0.7) + rng.normal(0, noise, shape) * (body if spec.modality != "CT" else 1)
        if spec.rgb or spec.file_ending in (".png", ".bmp"):
            image = np.clip((image - image.min()) / (np.ptp(image) + 1e-8) * 255.0, 0, 255)
        images.append(image.astype(np.float32))

    dims = len(shape)
    origin = tuple(float(v) for v in rng.uniform(-50, 50, dims)) if spec.oblique else (0.0,) * dims
    direction = _rotation(spec.seed, dims) if spec.oblique else tuple(np.eye(dims).ravel().tolist())
    geometry = Geometry(shape=shape, spacing=spacing, origin=origin, direction=direction)
    return np.stack(images), label, geometry


def sparse_label(label: np.ndarray, annotated_every: int, ignore_value: int = SPARSE_LABELS["ignore"]) -> np.ndarray:
    """``label`` ``[*S]`` with every slice along the first axis set to ``ignore_value`` except slices
    ``annotated_every // 2``, ``+ annotated_every``, ... (the middle of each group, so the object is hit)."""
    if annotated_every < 1:
        raise ValueError(f"annotated_every must be >= 1, got {annotated_every}")
    sparse = np.full_like(label, ignore_value)
    keep = slice(annotated_every // 2, None, annotated_every)
    sparse[keep] = label[keep]
    return sparse


def generate(out_dir: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write a complete raw dataset (dataset.json, imagesTr, labelsTr, optional imagesTs/labelsTs; kind
    "sparse" also labelsTr_dense)."""
    if spec.dims != len(spec.shape) or len(spec.shape) != len(spec.spacing):
        raise ValueError("shape and spacing must both have `dims` entries")
    if spec.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {spec.kind!r}")
    out = Path(out_dir)
    natural = spec.file_ending in (".png", ".bmp", ".tif", ".tiff")
    for index in range(spec.num_cases + spec.num_test):
        images, label, geometry = make_case(spec, index)
        if natural:
            geometry = Geometry(geometry.shape, (1.0,) * spec.dims, (0.0,) * spec.dims, geometry.direction)
        case_id = f"case_{index:03d}"
        training = index < spec.num_cases
        image_dir = out / (IMAGES_TRAIN if training else IMAGES_TEST)
        label_dir = out / (LABELS_TRAIN if training else "labelsTs")
        if spec.rgb:
            _write_rgb(images, image_dir / f"{case_id}_0000{spec.file_ending}")
        else:
            for channel, image in enumerate(images):
                data = image.astype(np.uint8) if natural else image
                write_image(data, geometry, image_dir / f"{case_id}_{channel:04d}{spec.file_ending}")
        if spec.kind == "sparse" and training:
            write_segmentation(label, geometry, out / DENSE_LABELS_FOLDER / f"{case_id}{spec.file_ending}")
            label = sparse_label(label, spec.annotated_every)
        write_segmentation(label, geometry, label_dir / f"{case_id}{spec.file_ending}")
    if spec.rgb:
        channel_names = {"0": "R", "1": "G", "2": "B"}
    elif spec.modality.upper() == "CT":
        channel_names = {str(c): "CT" for c in range(spec.channels)}
    else:
        channel_names = {str(c): f"MRI{c}" if spec.channels > 1 else "MRI" for c in range(spec.channels)}
    dataset_json = {
        "channel_names": channel_names,
        "labels": {"labels": LABELS, "regions": REGION_LABELS, "sparse": SPARSE_LABELS}[spec.kind],
        "numTraining": spec.num_cases,
        "file_ending": spec.file_ending,
        "name": out.name,
        "description": f"autoseg synthetic dataset (seed {spec.seed}, {spec.dims}D)",
    }
    if spec.kind == "regions":
        dataset_json["regions_class_order"] = REGIONS_CLASS_ORDER
    write_dataset_json(out / DATASET_JSON, dataset_json)
    return out


def _write_rgb(images: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    from autoseg.fileio import atomic_path

    rgb = np.moveaxis(images.astype(np.uint8), 0, -1)
    with atomic_path(path, suffix=path.suffix) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp))
