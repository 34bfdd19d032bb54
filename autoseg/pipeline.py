"""Runs that span stages: ``autoseg plan`` = planning, then preprocessing of the default configurations.

Why a module above the stages: the two steps share one stage lock (``preprocessed/<D>/.preprocessed.lock``,
held from before the fingerprint until the last case is written, so no other ``plan``/``preprocess`` run of
the dataset reads plans.json half-way), and whoever holds a lock around both stages must be able to import
both. When planning held it, planning imported preprocessing while preprocessing imported planning's
contracts: a cycle. Here the CLI's ``plan`` command and the public ``autoseg.plan_dataset`` share one path.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

from autoseg.contracts.plans import Plans
from autoseg.errors import PreprocessingError
from autoseg.locks import stage_lock
from autoseg.planning import plan_locked, planning_budget, raw_dataset_location
from autoseg.preprocessing.dataset import PREPROCESS_STAGE

logger = logging.getLogger(__name__)

__all__ = ["plan_dataset"]


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
    gpu_memory_gb, budget_source = planning_budget(gpu_memory_gb, preset)  # before the slow fingerprint
    if show_summary:
        print(budget_source)  # part of the user-facing summary, before the slow fingerprint
    else:
        logger.info("%s", budget_source)
    location = raw_dataset_location(dataset, root)
    location.preprocessed.mkdir(parents=True, exist_ok=True)
    # one plan/preprocess run per dataset: the lock's refusal names the other process
    with stage_lock(location.preprocessed, PREPROCESS_STAGE):
        plans = plan_locked(location, gpu_memory_gb, configurations=configurations, architectures=architectures,
                            patch_size=patch_size, num_workers=num_workers, skip_verify=skip_verify,
                            show_summary=show_summary, preset=preset)
        if preprocess:
            _preprocess_default_configurations(location.name, plans, root, num_workers, force, location.preprocessed)
        return plans


def _preprocess_default_configurations(name: str, plans: Plans, root: str | os.PathLike | None, num_workers: int,
                                       force: bool, preprocessed: os.PathLike) -> None:
    from autoseg.preprocessing import preprocess_dataset

    names = list(plans.default_configurations)
    for configuration in list(names):
        previous = plans.configurations[configuration].previous_stage
        if previous and previous not in names:
            names.append(previous)  # the cascade needs its low-resolution stage trained first
    report = preprocess_dataset(name, configurations=names, root=root, num_workers=num_workers, force=force,
                                lock=False)  # plan_dataset holds the lock already
    if not report.ok:
        first_case, first_message = report.failures[0]
        raise PreprocessingError(
            f"{preprocessed}: {len(report.failures)} case(s) failed to preprocess (first: "
            f"{first_case}: {first_message}); fix them and run `autoseg preprocess {name}`"
        )
