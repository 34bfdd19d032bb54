"""Preprocess every training case of a dataset for the planned configurations: parallel, resumable, and
robust to one bad case.

- One preprocessed folder per distinct ``data_identifier`` (configuration variants share their base's data).
- A worker pool (``spawn`` start method, so it behaves the same on Linux, macOS and Windows) gets one case per
  task; each worker reads, preprocesses and stores its case and returns only a short status, so memory stays
  bounded by ``num_workers`` cases whatever the dataset size.
- Reruns skip cases that ``store.is_complete`` accepts and redo partial ones. Every file is written
  atomically and the case JSON last, so a killed run leaves at worst leftover temporary files (removed at the
  start of the next run) and never a file that looks complete but is not. The computation is deterministic,
  so an interrupted-then-resumed run gives byte-identical files to an uninterrupted one.
- A case that fails is reported with its file name; the other cases still finish.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from autoseg.errors import AutosegError, ConfigurationError, DatasetError
from autoseg.planning.plans import PLANS_FILE, Configuration, Plans, load_plans
from autoseg.preprocessing.store import is_complete, save_case

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


_PLANS_CACHE: dict[str, Plans] = {}


def _plans_for(path: str) -> Plans:
    """Plans are read once per worker process, not once per case."""
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
            image, geometry, plans, configuration, label=label, case_id=task.case_id
        )
        del image, label
        save_case(task.output_folder, data, stored_label, properties)
        return task.case_id, None
    except AutosegError as exc:
        return task.case_id, str(exc)
    except Exception as exc:  # noqa: BLE001 - reported per case with its files, the run goes on
        files = ", ".join(Path(f).name for f in task.image_files)
        log.debug("case %s failed", task.case_id, exc_info=True)
        return task.case_id, f"{files}: {type(exc).__name__}: {exc}"


def remove_partial_files(folder: Path) -> int:
    """Delete temporary files a killed run left behind (``autoseg.fileio.atomic_path`` names them
    ``.<name>.<random>.partial<suffix>``). Returns how many were removed. Not safe while another
    preprocessing run writes into the same folder (that is not supported anyway)."""
    removed = 0
    if folder.is_dir():
        for path in folder.glob(".*.partial*"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


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
        with context.Pool(min(num_workers, len(tasks)), maxtasksperchild=50) as pool:
            for result in pool.imap_unordered(process_one, tasks, chunksize=1):
                results.append(result)
                progress.update()
    progress.close()
    return results


def preprocess_dataset(
    dataset: str | int,
    configurations: Sequence[str] | None = None,
    root: str | os.PathLike | None = None,
    num_workers: int = 2,
) -> PreprocessReport:
    """Preprocess all training cases of ``dataset`` for ``configurations`` (default: every configuration in
    plans.json) into ``preprocessed/<dataset>/<data_identifier>/``. See the module docstring for the rules."""
    from autoseg.dataset import list_training_cases, load_dataset_spec
    from autoseg.paths import resolve_dataset

    location = resolve_dataset(dataset, root)
    plans_file = location.preprocessed / PLANS_FILE
    if not plans_file.is_file():
        raise ConfigurationError(
            f"{plans_file}: no plans found; run `autoseg plan {location.name}` first (it writes plans.json)"
        )
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
    for identifier, configuration in selected.items():
        folder = location.preprocessed / identifier
        folder.mkdir(parents=True, exist_ok=True)
        leftovers = remove_partial_files(folder)
        if leftovers:
            log.info("%s: removed %d temporary file(s) of an interrupted run", folder, leftovers)
        tasks = []
        for case in cases:
            if is_complete(folder, case.case_id, with_label=True):
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
                )
            )
        log.info("%s: %d case(s) to preprocess, %d already complete", identifier, len(tasks), len(cases) - len(tasks))
        for case_id, message in sorted(_run_tasks(tasks, num_workers, f"preprocess {identifier}")):
            if message is None:
                report.processed += 1
            else:
                report.failures.append((case_id, message))
                log.error("%s: case %s failed: %s", identifier, case_id, message)
    report.ok = not report.failures
    return report
