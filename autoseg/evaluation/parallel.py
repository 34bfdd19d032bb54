"""Process pools for the evaluation stage, and how worker processes are started.

``fork`` starts workers instantly and needs no ``if __name__ == "__main__":`` guard in a user's script, but
forking a process that already runs torch's OpenMP/CUDA threads can deadlock the children. So: ``fork``
where the platform has it and torch is not loaded, ``spawn`` otherwise (training calls evaluation with torch
loaded; the CLI's entry point is import-safe for spawned children).
"""
from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

from tqdm import tqdm

from autoseg.workers import pool_initializer


def start_method() -> str:
    """``"fork"`` when safe (POSIX, torch not imported), else ``"spawn"``."""
    if "fork" in multiprocessing.get_all_start_methods() and "torch" not in sys.modules:
        return "fork"
    return "spawn"


def map_with_progress(
    function: Callable[[Any], Any], jobs: Sequence[Any], num_workers: int, description: str
) -> Iterator[Any]:
    """``function(job)`` for every job, in order, in up to ``num_workers`` processes (in this process when
    ``num_workers <= 1`` or there is one job), with a tqdm bar. ``function`` must be a module-level function."""
    bar = tqdm(total=len(jobs), desc=description, unit="case", disable=len(jobs) < 2, leave=False)
    try:
        if num_workers > 1 and len(jobs) > 1:
            context = multiprocessing.get_context(start_method())
            workers = min(num_workers, len(jobs))
            initializer, initargs = pool_initializer()  # workers die with this process, even on kill -9
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=context, initializer=initializer, initargs=initargs
            ) as pool:
                # small chunks keep the bar moving and the load balanced; big ones cut IPC for many tiny cases
                for result in pool.map(function, jobs, chunksize=max(1, len(jobs) // (8 * workers))):
                    bar.update()
                    yield result
        else:
            for job in jobs:
                result = function(job)
                bar.update()
                yield result
    finally:
        bar.close()


def run_all(function: Callable[[Any], Any], jobs: Iterable[Any], num_workers: int, description: str) -> list[Any]:
    """:func:`map_with_progress` collected into a list."""
    return list(map_with_progress(function, list(jobs), num_workers, description))
