"""Planning: fingerprint the raw dataset, decide every configuration (plans.json), make the folds.

``plan_dataset`` is what ``autoseg plan`` runs: verify -> fingerprint.json -> plans.json -> splits.json ->
a table of the configurations -> preprocessing of the default configurations. docs/planning.md explains
each rule and how to override it. All of it runs under the dataset's stage lock (the one `autoseg
preprocess` takes), so two `plan`/`preprocess` runs of one dataset never write the same files at once.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from autoseg.contracts.fingerprint import FINGERPRINT_FILE, save_fingerprint
from autoseg.contracts.plans import PLANS_FILE, Plans, save_plans
from autoseg.errors import DatasetError, PreprocessingError
from autoseg.planning.fingerprint import extract_fingerprint
from autoseg.planning.planner import format_plans_table, plan_from_fingerprint
from autoseg.planning.presets import get_preset, preset_memory
from autoseg.planning.splits import create_splits

logger = logging.getLogger(__name__)

__all__ = [
    "extract_fingerprint",
    "format_plans_table",
    "plan_dataset",
    "plan_from_fingerprint",
]


def _verify(raw: Path, num_workers: int) -> None:
    from autoseg.dataset.verify import verify_dataset

    report = verify_dataset(raw, num_workers=num_workers)
    if not report.ok:
        raise DatasetError(
            f"{raw}: the dataset does not verify, so it cannot be planned; fix the problems below (or pass "
            f"--skip-verify to plan anyway):\n{report.format()}"
        )


def plan_dataset(
    dataset: str | int,
    root: str | os.PathLike | None = None,
    gpu_memory_gb: float | None = None,
    configurations: Sequence[str] | None = None,
    architectures: Sequence[str] | None = None,
    patch_size: Sequence[int] | None = None,
    num_workers: int = 2,
    preprocess: bool = True,
    skip_verify: bool = False,
    show_summary: bool = True,
    preset: str | None = None,
    force: bool = False,
) -> Plans:
    """Plan ``dataset`` (folder name, number or name) and write, under ``preprocessed/<dataset>/``,
    ``fingerprint.json``, ``plans.json`` and (once) ``splits.json``; then preprocess the default
    configurations unless ``preprocess=False``.

    ``gpu_memory_gb``: the GPU size to plan for (GiB); None: CUDA device 0's memory, or 8 without CUDA
    (:func:`autoseg.device.gpu_memory_budget`). ``configurations``: base configurations to plan (2d,
    3d_fullres, 3d_lowres, 3d_cascade_fullres);
    ``architectures``: registry names (default: all that apply); ``patch_size``: force the patch of every
    configuration with as many axes; ``show_summary``: print the table of configurations; ``preset``: a planning
    preset (:mod:`autoseg.planning.presets`: ``resenc-m``, ``resenc-l``, ``resenc-xl``), whose GPU size replaces
    the device's unless ``gpu_memory_gb`` is given. ``force``:
    preprocess every case again, even those made from today's files and plan (without it, only cases whose
    inputs or plan entries changed are redone).
    """
    from autoseg.device import gpu_memory_budget
    from autoseg.locks import stage_lock
    from autoseg.paths import resolve_dataset
    from autoseg.preprocessing.dataset import PREPROCESS_STAGE

    if preset is not None:  # checked before the slow fingerprint; the preset's size replaces the device's
        gpu_memory_gb, budget_source = preset_memory(get_preset(preset), gpu_memory_gb)
    else:
        gpu_memory_gb, budget_source = gpu_memory_budget(gpu_memory_gb)
    if show_summary:
        print(budget_source)  # part of the user-facing summary, before the slow fingerprint
    else:
        logger.info("%s", budget_source)
    location = resolve_dataset(dataset, root)
    if not location.raw.is_dir():
        raise DatasetError(
            f"{location.raw}: no raw dataset folder; planning reads the raw images (put the dataset under raw/)"
        )
    location.preprocessed.mkdir(parents=True, exist_ok=True)
    # one plan/preprocess run per dataset: the lock's refusal names the other process
    with stage_lock(location.preprocessed, PREPROCESS_STAGE):
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

        if preprocess:
            from autoseg.preprocessing import preprocess_dataset

            names = list(plans.default_configurations)
            for name in list(names):
                previous = plans.configurations[name].previous_stage
                if previous and previous not in names:
                    names.append(previous)  # the cascade needs its low-resolution stage trained first
            report = preprocess_dataset(location.name, configurations=names, root=root, num_workers=num_workers,
                                        force=force, lock=False)  # this run holds the lock already
            if not report.ok:
                first_case, first_message = report.failures[0]
                raise PreprocessingError(
                    f"{location.preprocessed}: {len(report.failures)} case(s) failed to preprocess (first: "
                    f"{first_case}: {first_message}); fix them and run `autoseg preprocess {location.name}`"
                )
        return plans
