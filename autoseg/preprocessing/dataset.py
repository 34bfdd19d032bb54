"""Preprocess every training case of a dataset for the planned configurations: parallel, resumable, and
robust to one bad case.

- One preprocessed folder per distinct ``data_identifier`` (configuration variants share their base's data).
- A worker pool (``spawn`` start method, so it behaves the same on Linux, macOS and Windows) gets one case per
  task; each worker reads, preprocesses and stores its case and returns only a short status, so memory stays
  bounded by ``num_workers`` cases whatever the dataset size.
- Reruns skip cases that ``store.is_complete`` accepts *and* that were made from today's inputs and plan
  (``store.case_provenance``: a digest of each input file's bytes and :func:`plan_digest`), and redo partial
  or stale ones: raw files edited or replaced, or a re-planned spacing, normalisation or intensity
  statistics. ``force=True`` redoes every case. Every file is written atomically and the case JSON last, so
  a killed run leaves at worst leftover temporary files and never a file that looks complete but is not.
  The computation is deterministic, so an interrupted-then-resumed run gives byte-identical files to an
  uninterrupted one.
- One run per dataset at a time: the run holds ``autoseg.locks.stage_lock(preprocessed/<D>, "preprocessed")``
  (``autoseg plan`` holds the same lock while it plans and preprocesses); a second run is refused with a
  line naming the holder. Under the lock no other process writes into the folders, so the temporary files
  found at start-up are a killed run's, and are removed.
- A case that fails is reported with its file name; the other cases still finish.
- Unless the caller fixes ``num_workers``, the pool is as large as the cores allow (at most
  ``MAX_AUTO_WORKERS``) and no larger than free memory allows: :func:`estimate_case_peak_bytes` of the
  dataset's median case against ``MemAvailable`` (:func:`workers_for_memory`). The choice is logged.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from autoseg.contracts.plans import NORM_CT, PLANS_FILE, Configuration, Plans, load_plans
from autoseg.errors import AutosegError, ConfigurationError, DatasetError
from autoseg.fileio import remove_partial_files
from autoseg.preprocessing.store import case_provenance, input_record, is_complete, json_digest, save_case
from autoseg.workers import pool_initializer

log = logging.getLogger(__name__)


@dataclass
class PreprocessReport:
    """Outcome of :func:`preprocess_dataset`. ``failures`` holds ``(case_id, message)``; ``ok`` is False when
    any case failed. ``processed``/``skipped`` count cases over all data identifiers."""

    ok: bool
    failures: list[tuple[str, str]] = field(default_factory=list)
    processed: int = 0
    skipped: int = 0

    def format(self) -> str:
        lines = [f"preprocessed {self.processed} case(s), skipped {self.skipped} already complete"]
        lines += [f"  FAILED {case_id}: {message}" for case_id, message in self.failures]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Task:
    """One case for a worker: only paths and names travel between processes."""

    case_id: str
    image_files: tuple[str, ...]
    label_file: str | None
    plans_file: str
    configuration: str
    output_folder: str
    compression_threads: int | None = None  # blosc2 threads per worker: 1 in a pool, all cores when alone
    provenance: dict | None = None  # recorded in the case JSON (store.case_provenance)


_PLANS_CACHE: dict[str, Plans] = {}


def _plans_for(path: str) -> Plans:
    """Plans are read once per worker process, not once per case. Each run starts with an empty cache
    (:func:`_preprocess_locked`): cases run in this process when there is one worker, and a second run in the
    same process (``autoseg plan`` re-planning, a notebook) must not use the plans of the first."""
    if path not in _PLANS_CACHE:
        _PLANS_CACHE[path] = load_plans(path)
    return _PLANS_CACHE[path]


def process_one(task: _Task) -> tuple[str, str | None]:
    """Read, preprocess and store one case; ``(case_id, None)`` on success, ``(case_id, message)`` on failure.
    Never raises for a bad case: one broken file must not stop the others."""
    from autoseg.io import read_image, read_segmentation
    from autoseg.preprocessing.case import preprocess_case

    try:
        plans = _plans_for(task.plans_file)
        configuration = plans.configuration(task.configuration)
        if not task.image_files:
            raise DatasetError(
                f"{task.label_file}: has no image files <case>_0000{plans.file_ending} in imagesTr; "
                "add the case's images or remove its label"
            )
        image, geometry = read_image(list(task.image_files))
        label = None
        if task.label_file is not None:
            label, label_geometry = read_segmentation(task.label_file)
            if tuple(label_geometry.shape) != tuple(geometry.shape):
                raise DatasetError(
                    f"{task.label_file}: label shape {label_geometry.shape} differs from image shape "
                    f"{geometry.shape} ({Path(task.image_files[0]).name}); run `autoseg verify` and fix the case"
                )
        data, stored_label, properties = preprocess_case(
            image, geometry, plans, configuration, label=label, case_id=task.case_id,
            source=", ".join(task.image_files),
        )
        del image, label
        properties.provenance = task.provenance
        save_case(task.output_folder, data, stored_label, properties, patch_size=configuration.patch_size,
                  nthreads=task.compression_threads)
        return task.case_id, None
    except AutosegError as exc:
        return task.case_id, str(exc)
    except Exception as exc:  # noqa: BLE001 - reported per case with its files, the run goes on
        files = ", ".join(Path(f).name for f in task.image_files)
        log.debug("case %s failed", task.case_id, exc_info=True)
        return task.case_id, f"{files}: {type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------ provenance
# Bump when a change to the preprocessing code changes the stored arrays of unchanged inputs, so that
# existing stores are redone rather than mixed with new ones.
PREPROCESSING_VERSION = 1


def plan_digest(plans: Plans, configuration: Configuration) -> str:
    """A digest of everything in ``plans`` that changes ``configuration``'s stored arrays: target spacing,
    dimensionality, normalisation (and, for CT channels, the dataset's intensity statistics), resampling
    orders and rules, the axis order, the labels (label grid and class locations), the channel count and
    the preprocessed folder. Not the patch size (it changes only the b2nd chunking, not a value) or the
    architecture, which share one preprocessed folder between configurations."""
    resampling = asdict(configuration.resampling)
    resampling.pop("order_probabilities", None)  # used only when restoring predictions
    ct_channels = [str(c) for c, scheme in enumerate(configuration.normalization) if scheme == NORM_CT]
    return json_digest({
        "version": PREPROCESSING_VERSION,
        "data_identifier": configuration.data_identifier,
        "dims": configuration.dims,
        "target_spacing": [float(s) for s in configuration.target_spacing],
        "normalization": list(configuration.normalization),
        "use_mask_for_norm": [bool(m) for m in configuration.use_mask_for_norm],
        "resampling": resampling,
        "intensity_stats": {c: asdict(plans.intensity_stats[c]) for c in ct_channels if c in plans.intensity_stats},
        "transpose_forward": plans.transpose_forward,
        "labels": plans.labels,
        "num_channels": plans.num_channels,
    })


def _input_records(cases: list) -> dict[str, list[list[str]]]:
    """``case_id -> store.input_record`` of every case, hashed once per run whatever the number of data
    identifiers; in threads (hashlib releases the GIL on large buffers, so disk reads and hashing overlap)."""
    def one(case) -> tuple[str, list[list[str]]]:
        files = [*case.image_files, *([case.label_file] if case.label_file is not None else [])]
        return case.case_id, input_record(files)

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        records = dict(pool.map(one, cases))
    log.info("hashed the input files of %d case(s) in %.1f s", len(cases), time.monotonic() - start)
    return records


# ------------------------------------------------------------------------------------ workers from memory
MAX_AUTO_WORKERS = 8  # beyond ~8 processes preprocessing is bound by disk reads and writes, not by cores
# Fraction of MemAvailable the pool may plan to use: the estimate is for the median case, and a case twice
# its size must still fit next to the others
MEMORY_FRACTION = 0.7


def estimate_case_peak_bytes(
    shape_before_crop: Sequence[float],
    shape_after_crop: Sequence[float],
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    num_channels: int,
) -> int:
    """Peak memory in bytes of preprocessing one case (one worker), from its shapes (voxels, array axis order)
    and spacings (mm). ``target_spacing`` may cover only the last axes (a 2D configuration resamples the
    in-plane axes of 3D images); leading axes keep their size.

    Counted as float32 copies, from what ``preprocess_case`` holds at once: per channel the image as read and
    its cropped, normalised copy, the resampled image and one same-sized scratch array of the spline
    prefilter; the label as read, its crop, and the resampled label with two float32 scratch maps of the
    per-class resampling. An estimate to size a pool, good to a small factor, not a guarantee.
    """
    read = math.prod(float(v) for v in shape_before_crop)
    cropped = math.prod(float(v) for v in shape_after_crop)
    resampled_axes = len(target_spacing)
    zoom = math.prod(float(s) / float(t) for s, t in zip(list(spacing)[-resampled_axes:], target_spacing))
    resampled = cropped * zoom
    float32_copies = num_channels * (read + cropped + 2 * resampled) + (read + cropped + 3 * resampled)
    return int(4 * float32_copies)


def available_memory_bytes() -> int | None:
    """Memory the OS can give new processes without swapping (``MemAvailable``), None where unknown."""
    try:
        import psutil  # optional: not a dependency, but the portable answer where installed

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file says kB and means KiB
    except (OSError, ValueError, IndexError):
        return None
    return None


def workers_for_memory(max_workers: int, available_bytes: int | None, case_bytes: int) -> int:
    """Worker processes: ``max_workers``, fewer when ``MEMORY_FRACTION`` of ``available_bytes`` cannot hold
    that many cases of ``case_bytes``; at least 1 (one case has to run, whatever memory says); ``max_workers``
    when memory is unknown."""
    if available_bytes is None:
        return max(1, max_workers)
    fits = int(MEMORY_FRACTION * available_bytes // max(1, case_bytes))
    return max(1, min(max_workers, fits))


def _auto_workers(preprocessed: Path, configuration: Configuration, num_channels: int) -> int:
    """The pool size for one configuration when the caller left it open (see the module docstring)."""
    from autoseg.contracts.fingerprint import FINGERPRINT_FILE, load_fingerprint

    max_workers = min(MAX_AUTO_WORKERS, os.cpu_count() or 1)
    fingerprint_file = preprocessed / FINGERPRINT_FILE
    if not fingerprint_file.is_file():
        log.info("%s: %d workers (no %s to size them by memory)", configuration.name, max_workers, FINGERPRINT_FILE)
        return max_workers
    fingerprint = load_fingerprint(fingerprint_file)
    case_bytes = estimate_case_peak_bytes(
        np.median([c.shape_before_crop for c in fingerprint.cases], axis=0),
        np.median([c.shape_after_crop for c in fingerprint.cases], axis=0),
        fingerprint.median_spacing,
        configuration.target_spacing,
        num_channels,
    )
    available = available_memory_bytes()
    workers = workers_for_memory(max_workers, available, case_bytes)
    free = f"{available / 1e9:.1f} GB" if available is not None else "unknown"
    log.info("%s: %d worker(s) (free RAM %s, ~%.1f GB per case)", configuration.name, workers, free, case_bytes / 1e9)
    return workers


def _select_configurations(plans: Plans, names: Sequence[str] | None) -> dict[str, Configuration]:
    """The first requested configuration of each data identifier, in request (or plans) order."""
    chosen = [plans.configuration(name) for name in names] if names else list(plans.configurations.values())
    by_identifier: dict[str, Configuration] = {}
    for configuration in chosen:
        by_identifier.setdefault(configuration.data_identifier, configuration)
    return by_identifier


def _run_tasks(tasks: list[_Task], num_workers: int, description: str) -> list[tuple[str, str | None]]:
    results: list[tuple[str, str | None]] = []
    progress = tqdm(total=len(tasks), desc=description, unit="case", disable=not tasks)
    if num_workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            results.append(process_one(task))
            progress.update()
    else:
        context = multiprocessing.get_context("spawn")
        # one case per task and maxtasksperchild bounds what a long-lived worker can accumulate
        initializer, initargs = pool_initializer()  # workers die with this process, even on kill -9
        with context.Pool(
            min(num_workers, len(tasks)), maxtasksperchild=50, initializer=initializer, initargs=initargs
        ) as pool:
            for result in pool.imap_unordered(process_one, tasks, chunksize=1):
                results.append(result)
                progress.update()
    progress.close()
    return results


# The stage lock of preprocessed/<D> (file .preprocessed.lock), held by `autoseg preprocess` and for the whole of
# `autoseg plan`: planning rewrites plans.json, which a concurrent preprocessing run would read half-way.
PREPROCESS_STAGE = "preprocessed"


def preprocess_dataset(
    dataset: str | int,
    configurations: Sequence[str] | None = None,
    root: str | os.PathLike | None = None,
    num_workers: int | None = None,
    force: bool = False,
    lock: bool = True,
) -> PreprocessReport:
    """Preprocess all training cases of ``dataset`` for ``configurations`` (default: every configuration in
    plans.json) into ``preprocessed/<dataset>/<data_identifier>/``. ``num_workers``: processes; None sizes
    the pool from cores and free memory. ``force``: redo every case, current or not. ``lock=False`` only for
    a caller that already holds the dataset's "preprocessed" stage lock (``plan_dataset``). See the module
    docstring for the rules."""
    from autoseg.locks import stage_lock
    from autoseg.paths import resolve_dataset

    location = resolve_dataset(dataset, root)
    if not lock:
        return _preprocess_locked(location, configurations, num_workers, force)
    location.preprocessed.mkdir(parents=True, exist_ok=True)
    with stage_lock(location.preprocessed, PREPROCESS_STAGE):
        return _preprocess_locked(location, configurations, num_workers, force)


def _preprocess_locked(location, configurations: Sequence[str] | None, num_workers: int | None,
                       force: bool) -> PreprocessReport:
    from autoseg.dataset import list_training_cases, load_dataset_spec

    plans_file = location.preprocessed / PLANS_FILE
    if not plans_file.is_file():
        raise ConfigurationError(
            f"{plans_file}: no plans found; run `autoseg plan {location.name}` first (it writes plans.json)"
        )
    _PLANS_CACHE.clear()
    plans = load_plans(plans_file)
    selected = _select_configurations(plans, configurations)
    spec = load_dataset_spec(location.raw)
    cases = list_training_cases(location.raw, spec)
    if not cases:
        raise DatasetError(
            f"{location.raw / 'labelsTr'}: no training cases found (expected <case>{spec.file_ending} label files); "
            "check the dataset with `autoseg verify`"
        )

    report = PreprocessReport(ok=True)
    inputs = _input_records(cases)
    for identifier, configuration in selected.items():
        folder = location.preprocessed / identifier
        folder.mkdir(parents=True, exist_ok=True)
        leftovers = remove_partial_files(folder)
        if leftovers:
            log.info("%s: removed %d temporary file(s) of an interrupted run", folder, leftovers)
        workers = num_workers if num_workers is not None else _auto_workers(
            location.preprocessed, configuration, plans.num_channels)
        # several workers share the cores: one blosc2 thread each; a lone worker may use them all
        compression_threads = 1 if workers > 1 else None
        digest = plan_digest(plans, configuration)
        tasks = []
        for case in cases:
            provenance = case_provenance(inputs[case.case_id], digest)
            if not force and is_complete(folder, case.case_id, with_label=True, provenance=provenance):
                report.skipped += 1
                continue
            tasks.append(
                _Task(
                    case_id=case.case_id,
                    image_files=tuple(str(p) for p in case.image_files),
                    label_file=str(case.label_file) if case.label_file is not None else None,
                    plans_file=str(plans_file),
                    configuration=configuration.name,
                    output_folder=str(folder),
                    compression_threads=compression_threads,
                    provenance=provenance,
                )
            )
        log.info("%s: %d case(s) to preprocess, %d already complete and current%s", identifier, len(tasks),
                 len(cases) - len(tasks), " (--force: redoing all)" if force else "")
        for case_id, message in sorted(_run_tasks(tasks, workers, f"preprocess {identifier}")):
            if message is None:
                report.processed += 1
            else:
                report.failures.append((case_id, message))
                log.error("%s: case %s failed: %s", identifier, case_id, message)
    report.ok = not report.failures
    return report
