"""The dataset fingerprint: what the planner needs to know about a raw dataset, measured once.

Per case: spacing, shape before and after cropping to the nonzero region, the relative size of that crop,
per-channel intensity statistics of the foreground (voxels with label > 0), and label volumes. Dataset
level: the same intensity statistics over a seeded sample of foreground voxels of every case, median
shape and spacing, spacing percentiles, the median relative size after cropping, label volumes.

Facts behind the choices (nnU-Net v2's published method, its fingerprint):

- crop to nonzero: mask = any channel != 0 with holes filled; the bounding box of the mask is kept.
- nnU-Net samples about 1e8 / num_cases foreground voxels per case. Percentiles of a few thousand samples
  per case are already stable to well under 1 % on typical data, so we take ``SAMPLES_PER_CASE`` = 10,000
  (design.md section 2), seeded by the case's position in the sorted case list: the same dataset gives the
  same ``fingerprint.json`` byte for byte, whatever the number of workers.

The measuring lives here; the dataclasses and the file (`fingerprint.json`) are the contract in
:mod:`autoseg.contracts.fingerprint`, which preprocessing reads without importing planning.

Shapes and spacings are in array axis order ``(Z, Y, X)`` for 3D images and ``(Y, X)`` for 2D images.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.ndimage import binary_fill_holes
from tqdm import tqdm

from autoseg.contracts.fingerprint import SAMPLES_PER_CASE, CaseFingerprint, Fingerprint
from autoseg.contracts.plans import IntensityStats
from autoseg.dataset import Case, DatasetSpec, list_training_cases, load_dataset_spec
from autoseg.errors import DatasetError
from autoseg.io import read_image, read_segmentation
from autoseg.workers import pool_initializer

logger = logging.getLogger(__name__)

SAMPLING_SEED = 1234  # any fixed number: only determinism matters


# ------------------------------------------------------------------------------------------- numerics
def nonzero_bounding_box(image: np.ndarray) -> list[tuple[int, int]]:
    """Bounding box ``[(start, stop) per spatial axis]`` of the nonzero region of ``image`` ``[C, *spatial]``.

    The mask is "any channel != 0" with holes filled (so dark structures inside the body stay in the crop).
    An all-zero image keeps its full extent.
    """
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return [(0, n) for n in mask.shape]
    mask = binary_fill_holes(mask)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return box


def intensity_statistics(values: np.ndarray) -> IntensityStats:
    """Mean, std (population), median, min, max, percentiles 0.5 and 99.5 of a 1-D array of intensities.

    Empty input (no foreground) gives NaN-free zeros so the JSON stays valid; the planner only uses the
    dataset-level statistics, which pool every case.
    """
    if values.size == 0:
        return IntensityStats(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    values = values.astype(np.float64, copy=False)
    p_low, median, p_high = np.percentile(values, [0.5, 50.0, 99.5])
    return IntensityStats(
        mean=float(values.mean()),
        std=float(values.std()),
        median=float(median),
        min=float(values.min()),
        max=float(values.max()),
        percentile_00_5=float(p_low),
        percentile_99_5=float(p_high),
    )


def sample_foreground(
    image: np.ndarray, label: np.ndarray, num_samples: int, seed: Sequence[int], ignore_value: int | None = None
) -> np.ndarray:
    """``num_samples`` foreground voxels (label > 0, never ``ignore_value``: unannotated voxels may be
    anything) of every channel, ``[C, num_samples]`` float32
    (``[C, 0]`` when the case has no foreground).

    Drawn with replacement, so every case contributes the same number of samples whatever its foreground
    size: the pooled statistics weight cases equally, as nnU-Net's do (it also samples a fixed count per
    case with replacement). The same voxel positions are used for every channel. ``seed`` seeds a
    ``numpy.random.default_rng``.
    """
    flat_label = label.reshape(-1)
    foreground = np.flatnonzero((flat_label > 0) & (flat_label != ignore_value) if ignore_value is not None
                                else flat_label > 0)
    if foreground.size:
        rng = np.random.default_rng(list(seed))
        foreground = np.sort(rng.choice(foreground, size=num_samples, replace=True))
    flat = image.reshape(image.shape[0], -1)
    return flat[:, foreground].astype(np.float32)


@dataclass
class _CaseResult:
    fingerprint: CaseFingerprint
    samples: np.ndarray  # [C, n] float32


def fingerprint_case(
    case: Case, index: int, num_samples: int = SAMPLES_PER_CASE, ignore_value: int | None = None
) -> _CaseResult:
    """Read one case and measure it (runs in a worker; holds one case in memory). Voxels labelled
    ``ignore_value`` (the dataset's ignore label) are not foreground: their intensities are not sampled."""
    image, geometry = read_image(case.image_files)
    assert case.label_file is not None
    label, label_geometry = read_segmentation(case.label_file)
    if tuple(label.shape) != tuple(image.shape[1:]):
        raise DatasetError(
            f"{case.label_file}: label shape {tuple(label.shape)} differs from image shape "
            f"{tuple(image.shape[1:])}; run `autoseg verify` to find every mismatched case"
        )
    box = nonzero_bounding_box(image)
    shape_before = [int(n) for n in image.shape[1:]]
    shape_after = [stop - start for start, stop in box]
    relative = float(np.prod(shape_after, dtype=np.float64) / np.prod(shape_before, dtype=np.float64))

    foreground = (label > 0) & (label != ignore_value) if ignore_value is not None else label > 0
    stats = {str(c): intensity_statistics(image[c][foreground]) for c in range(image.shape[0])}
    values, counts = np.unique(label, return_counts=True)
    label_voxels = {str(int(v)): int(n) for v, n in zip(values, counts)}
    samples = sample_foreground(image, label, num_samples, (SAMPLING_SEED, index), ignore_value)
    return _CaseResult(
        CaseFingerprint(
            case_id=case.case_id,
            spacing=[float(s) for s in geometry.spacing],
            shape_before_crop=shape_before,
            shape_after_crop=shape_after,
            relative_size_after_crop=relative,
            intensity_stats=stats,
            label_voxels=label_voxels,
        ),
        samples,
    )


def _fingerprint_case_star(args: tuple[Case, int, int, int | None]) -> _CaseResult:
    return fingerprint_case(*args)


def summarize(
    results: Sequence[_CaseResult], spec: DatasetSpec, dataset_name: str, num_samples: int = SAMPLES_PER_CASE
) -> Fingerprint:
    """Dataset-level statistics from the per-case results (pure; order of ``results`` = case order)."""
    cases = [r.fingerprint for r in results]
    num_channels = max(r.samples.shape[0] for r in results)
    pooled = {
        str(c): intensity_statistics(np.concatenate([r.samples[c] for r in results if r.samples.shape[0] > c]))
        for c in range(num_channels)
    }
    spacings = np.array([c.spacing for c in cases], dtype=np.float64)
    shapes = np.array([c.shape_after_crop for c in cases], dtype=np.float64)
    voxel_volume = np.prod(spacings, axis=1)
    label_volumes = {}
    for value in sorted(spec.label_values):
        volumes = [c.label_voxels.get(str(value), 0) * v for c, v in zip(cases, voxel_volume)]
        label_volumes[str(value)] = float(np.median(volumes))
    return Fingerprint(
        dataset_name=dataset_name,
        channel_names={str(k): v for k, v in sorted(spec.channel_names.items())},
        # plain labels listed by value as before; region labels keep their order (it is their meaning)
        labels=dict(spec.labels) if spec.regions_class_order is not None
        else dict(sorted(spec.labels.items(), key=lambda kv: kv[1])),
        file_ending=spec.file_ending,
        cases=cases,
        intensity_stats=pooled,
        median_spacing=[float(v) for v in np.median(spacings, axis=0)],
        spacing_percentile_10=[float(v) for v in np.percentile(spacings, 10, axis=0)],
        spacing_percentile_90=[float(v) for v in np.percentile(spacings, 90, axis=0)],
        median_shape_after_crop=[float(v) for v in np.median(shapes, axis=0)],
        median_relative_size_after_crop=float(np.median([c.relative_size_after_crop for c in cases])),
        label_volume_median_mm3=label_volumes,
        samples_per_case=num_samples,
        regions_class_order=None if spec.regions_class_order is None else list(spec.regions_class_order),
        label_order=list(spec.labels) if spec.regions_class_order is not None else None,
    )


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds; the workers only read images (no torch), so it is safe here
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def extract_fingerprint(
    raw_dir: str | os.PathLike,
    num_workers: int = 2,
    num_samples: int = SAMPLES_PER_CASE,
    progress: bool = True,
) -> Fingerprint:
    """Fingerprint the raw dataset in ``raw_dir`` (nnU-Net v2 layout), ``num_workers`` cases in parallel.

    Every worker holds one case in memory at a time. Raises DatasetError when there are no training cases
    or a case's label does not match its image.
    """
    raw_dir = Path(raw_dir)
    spec = load_dataset_spec(raw_dir)
    cases = list_training_cases(raw_dir, spec)
    if not cases:
        raise DatasetError(
            f"{raw_dir}: no training cases found (expected labelsTr/<case>{spec.file_ending} with images in "
            f"imagesTr/); run `autoseg verify {raw_dir.name}`"
        )
    ignore_value = spec.label_scheme.ignore_value
    jobs = [(case, index, num_samples, ignore_value) for index, case in enumerate(cases)]
    bar = dict(total=len(jobs), desc="fingerprint", unit="case", disable=not progress)
    if num_workers <= 1 or len(jobs) == 1:
        results = [fingerprint_case(*job) for job in tqdm(jobs, **bar)]
    else:
        workers = min(num_workers, len(jobs))
        initializer, initargs = pool_initializer()  # workers die with this process, even on kill -9
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=_pool_context(), initializer=initializer, initargs=initargs
        ) as pool:
            # map keeps case order, so the output does not depend on scheduling
            results = list(tqdm(pool.map(_fingerprint_case_star, jobs), **bar))
    dims = {len(r.fingerprint.spacing) for r in results}
    if len(dims) > 1:
        raise DatasetError(
            f"{raw_dir}: cases mix 2D and 3D images ({sorted(dims)} dimensions); a dataset must be one or the other"
        )
    fingerprint = summarize(results, spec, raw_dir.name, num_samples)
    logger.info(
        "fingerprinted %d cases: median spacing %s, median shape after crop %s",
        fingerprint.num_cases, fingerprint.median_spacing, fingerprint.median_shape_after_crop,
    )
    return fingerprint
