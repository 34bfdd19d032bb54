"""Planning: fingerprint the raw dataset, decide every configuration (plans.json), make the folds.

:func:`plan_locked` is the planning part of ``autoseg plan``: verify -> fingerprint.json -> plans.json ->
splits.json -> a table of the configurations. docs/planning.md explains each rule and how to override it.
``autoseg plan`` itself (``autoseg.plan_dataset``, :mod:`autoseg.pipeline`) also preprocesses the default
configurations, under one stage lock around both; that orchestration lives above the stages so that planning
never imports preprocessing.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from autoseg.contracts.fingerprint import FINGERPRINT_FILE, save_fingerprint
from autoseg.contracts.plans import PLANS_FILE, Plans, save_plans
from autoseg.errors import DatasetError
from autoseg.paths import DatasetLocation, resolve_dataset
from autoseg.planning.fingerprint import extract_fingerprint
from autoseg.planning.planner import format_plans_table, plan_from_fingerprint
from autoseg.planning.presets import get_preset, preset_memory
from autoseg.planning.splits import create_splits

logger = logging.getLogger(__name__)

__all__ = [
    "extract_fingerprint",
    "format_plans_table",
    "plan_from_fingerprint",
    "plan_locked",
    "planning_budget",
    "raw_dataset_location",
]


def _verify(raw: Path, num_workers: int) -> None:
    from autoseg.dataset.verify import verify_dataset

    report = verify_dataset(raw, num_workers=num_workers)
    if not report.ok:
        raise DatasetError(
            f"{raw}: the dataset does not verify, so it cannot be planned; fix the problems below (or pass "
            f"--skip-verify to plan anyway):\n{report.format()}"
        )


def planning_budget(gpu_memory_gb: float | None, preset: str | None) -> tuple[float, str]:
    """The GPU size to plan for (GiB) and one line saying where it comes from. ``preset`` (checked here, before
    the slow fingerprint): its GPU size replaces the device's unless ``gpu_memory_gb`` is given; without one,
    ``gpu_memory_gb`` or CUDA device 0's memory, 8 without CUDA (:func:`autoseg.device.gpu_memory_budget`)."""
    from autoseg.device import gpu_memory_budget

    if preset is not None:
        return preset_memory(get_preset(preset), gpu_memory_gb)
    return gpu_memory_budget(gpu_memory_gb)


def raw_dataset_location(dataset: str | int, root: str | os.PathLike | None = None) -> DatasetLocation:
    """The folders of ``dataset``, refused (DatasetError) when it has no raw folder to plan from."""
    location = resolve_dataset(dataset, root)
    if not location.raw.is_dir():
        raise DatasetError(
            f"{location.raw}: no raw dataset folder; planning reads the raw images (put the dataset under raw/)"
        )
    return location


def plan_locked(
    location: DatasetLocation,
    gpu_memory_gb: float,
    configurations: Sequence[str] | None = None,
    architectures: Sequence[str] | None = None,
    patch_size: Sequence[int] | None = None,
    num_workers: int = 2,
    skip_verify: bool = False,
    show_summary: bool = True,
    preset: str | None = None,
) -> Plans:
    """Verify the raw dataset, then write under ``location.preprocessed``: ``fingerprint.json``, ``plans.json``
    and (once) ``splits.json``; print the table of configurations when ``show_summary``.

    The caller holds the dataset's "preprocessed" stage lock (``autoseg.locks.stage_lock``): planning rewrites
    plans.json, which a concurrent preprocessing run would read half-way. ``gpu_memory_gb``: from
    :func:`planning_budget`. The other arguments: :func:`autoseg.pipeline.plan_dataset`.
    """
    if not skip_verify:
        _verify(location.raw, num_workers)
    fingerprint = extract_fingerprint(location.raw, num_workers=num_workers)
    fingerprint.dataset_name = location.name
    save_fingerprint(fingerprint, location.preprocessed / FINGERPRINT_FILE)

    plans = plan_from_fingerprint(
        fingerprint, gpu_memory_gb=gpu_memory_gb, configurations=configurations,
        architectures=architectures, patch_size=patch_size, preset=preset,
    )
    save_plans(plans, location.preprocessed / PLANS_FILE)
    create_splits(location.preprocessed, fingerprint.case_ids)
    logger.info("wrote %s", location.preprocessed / PLANS_FILE)
    if show_summary:
        # a deliberate user-facing summary (the CLI's output)
        print(f"plans for {location.name} ({location.preprocessed / PLANS_FILE}):")
        print(format_plans_table(plans))
    return plans
