"""`autoseg predict`: segment a folder of images (or one file) with trained folds.

Pipeline per run: find the cases in the input (this job's share of them with ``part``/``parts``); check
that the output folder is writable; load the model once; then, while the network predicts case ``i``,
reader threads read and preprocess case ``i + 1`` (and the next ones, up to ``num_workers`` ahead) and
writer threads restore + write case ``i - 1`` slab by slab (memory: a few slabs of all classes, never the
float32 probabilities of the whole image). A case that cannot be read or does not fit the model is
reported with its file and the reason and skipped; the others are still predicted. Every output file is
written atomically, so an interrupted run never leaves a half-written segmentation.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from autoseg.errors import AutosegError, ConfigurationError, ImageReadError, PredictionError
from autoseg.fileio import remove_partial_files
from autoseg.inference.outputs import probabilities_file
from autoseg.inference.predictor import DEFAULT_CHECKPOINT, Predictor
from autoseg.inference.streaming import RESULTS_RAM_BYTES
from autoseg.io import SUPPORTED_ENDINGS, Geometry, file_ending, read_image, write_segmentation
from autoseg.io.dicom import (
    DICOM_SEG_ENDING, find_dicom_series, is_dicom_file, read_dicom_series, require_dicom_seg_writer,
    write_dicom_seg,
)
from autoseg.io.readers import NATURAL_IMAGE_ENDINGS

log = logging.getLogger(__name__)

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_LOOKS_LIKE_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.[^/]+$")
# "nifti": a label image with the input's file ending (NIfTI for DICOM series); "dicom-seg": a DICOM
# Segmentation referencing the input series (DICOM input only)
OUTPUT_FORMATS = ("nifti", "dicom-seg")
DICOM_OUTPUT_ENDING = ".nii.gz"  # segmentations of DICOM series, unless --output-format dicom-seg


@dataclass
class InputCase:
    """One case to predict: its files in channel order and the ending its segmentation will have.
    ``problem`` is set when the case cannot be predicted (reported, not raised). ``dicom``: ``files`` are
    the slices of one DICOM series (one channel), kept so that a DICOM-SEG can reference them."""

    case_id: str
    files: tuple[Path, ...]
    ending: str
    problem: str | None = None
    dicom: bool = False


@dataclass
class PredictReport:
    """Outcome of a prediction run. ``failures``: ``(case_id, one-line reason naming the file)``."""

    ok: bool
    failures: list[tuple[str, str]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    seconds_per_case: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        lines = [f"predicted {len(self.written)} case(s)" + (f", {len(self.failures)} failed:" if self.failures else "")]
        lines += [f"  {case_id}: {reason}" for case_id, reason in self.failures]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- input cases
def find_input_cases(input_path: str | os.PathLike, num_channels: int | None = None) -> list[InputCase]:
    """Cases in a folder of images, or the one case of a single file; DICOM series in the folder or its
    subfolders are cases too (:func:`autoseg.io.find_dicom_series` names them).

    Naming: ``<case>_<CCCC><ending>``, one file per channel, as in the raw ``imagesTs/``. A model with ONE
    channel (``num_channels=1``) also takes images as people name them: any image file is channel 0 of the
    case named like the file without its ending (``hippocampus_001.nii.gz`` -> case ``hippocampus_001``;
    ``x_0000.nii.gz`` stays case ``x``). With several channels (or ``num_channels=None``, unknown) the
    ``_CCCC`` rule stays; with the count known, a case lacking channel files (or a file without a channel
    number) is reported with the file names it needs.

    Files named like channel files but with an ending autoseg cannot read, cases with gaps in their channel
    numbers, and two files that would be the same case become cases with a ``problem``. Other files
    (dataset.json, notes) are ignored.
    """
    path = Path(input_path)
    if path.is_file() and is_dicom_file(path):
        return [InputCase(path.name, (path,), DICOM_OUTPUT_ENDING, f"{path}: a single DICOM file; pass the folder "
                          "holding its whole series (or a folder of series folders)", dicom=True)]
    if path.is_file():
        ending = file_ending(path)
        if ending is None:
            return [InputCase(path.name, (path,), "", f"{path}: unknown file ending; expected one of "
                              f"{', '.join(SUPPORTED_ENDINGS)}")]
        stem = path.name[: -len(ending)]
        match = _CHANNEL.match(stem)
        return [InputCase(match.group("case") if match else stem, (path,), ending)]
    if not path.is_dir():
        raise PredictionError(f"{path}: input does not exist; pass a folder of <case>_0000<ending> images or one file")

    groups: dict[str, dict[int, Path]] = {}
    endings: dict[str, set[str]] = {}
    problems: dict[str, str] = {}
    unnumbered: dict[str, tuple[Path, str]] = {}  # case -> (file, ending) of images without _CCCC
    for item in sorted(path.iterdir()):
        if item.name.startswith(".") or not item.is_file():
            continue
        ending = file_ending(item)
        if ending is None:
            match = _LOOKS_LIKE_CHANNEL.match(item.name)
            if match:
                problems.setdefault(match.group("case"), f"{item}: unknown file ending; expected one of "
                                    f"{', '.join(SUPPORTED_ENDINGS)}")
            else:
                log.debug("ignoring %s (not an image)", item)
            continue
        stem = item.name[: -len(ending)]
        match = _CHANNEL.match(stem)
        if not match:
            if num_channels == 1:
                unnumbered[stem] = (item, ending)  # one-channel model: any image is a case, named like the file
            elif num_channels is None:
                log.warning("ignoring %s: image names must end in _0000%s (channel index)", item, ending)
            else:
                expected = ", ".join(f"{stem}_{c:04d}{ending}" for c in range(num_channels))
                problems.setdefault(stem, f"{item}: the model takes {num_channels} channels, one file each; "
                                    f"expected {expected} (rename the files, or use a one-channel model)")
            continue
        case_id = match.group("case")
        groups.setdefault(case_id, {})[int(match.group("channel"))] = item
        endings.setdefault(case_id, set()).add(ending)
    if num_channels == 1:
        # scan_0001, scan_0002 without a scan_0000: scans numbered by people, not channels; each is a case.
        # (x_0000 with x_0001 stays one case with two channel files, reported as such below.)
        for case_id in [c for c, channels in groups.items() if 0 not in channels]:
            for channel, item in groups.pop(case_id).items():
                unnumbered[f"{case_id}_{channel:04d}"] = (item, file_ending(item) or "")
            endings.pop(case_id, None)
    for case_id, (item, ending) in sorted(unnumbered.items()):
        if case_id in groups:
            other = groups[case_id][min(groups[case_id])]
            problems[case_id] = (f"{item} and {other} would both be case '{case_id}'; keep one of them "
                                 "(or rename one) so each case has one image")
            continue
        groups[case_id] = {0: item}
        endings[case_id] = {ending}

    cases = []
    for case_id in sorted(set(groups) | set(problems)):
        channels = groups.get(case_id, {})
        files = tuple(channels[c] for c in sorted(channels))
        case_endings = sorted(endings.get(case_id, set()))
        problem = problems.get(case_id)
        if problem is None and len(case_endings) > 1:
            problem = f"{files[0]}: channel files have different endings ({', '.join(case_endings)}); use one format"
        if problem is None and sorted(channels) != list(range(len(channels))):
            found = ", ".join(f"_{c:04d}" for c in sorted(channels))
            problem = (f"{files[0]}: channel files must be numbered _0000, _0001, ... without gaps; found {found}")
        if problem is None and num_channels is not None and len(channels) != num_channels and not (
            len(channels) == 1 and case_endings[0] in NATURAL_IMAGE_ENDINGS  # a colour image holds its channels
        ):
            ending = case_endings[0]
            expected = ", ".join(f"{case_id}_{c:04d}{ending}" for c in range(num_channels))
            missing = [f"{case_id}_{c:04d}{ending}" for c in range(num_channels) if c not in channels]
            found = ", ".join(f.name for f in files)
            problem = (f"{files[0]}: expected {num_channels} channel file(s) per case ({expected}), found {found}"
                       + (f"; missing {', '.join(missing)}" if missing else "; the model takes fewer channels"))
        cases.append(InputCase(case_id, files, case_endings[0] if case_endings else "", problem))
    taken = {case.case_id for case in cases}
    for series in find_dicom_series(path):
        clash = None
        if series.name in taken:
            clash = f"{series.folder}: case id {series.name} is also the name of another case in {path}; rename one"
        taken.add(series.name)
        cases.append(InputCase(series.name, series.files, DICOM_OUTPUT_ENDING, clash, dicom=True))
    if not cases:
        raise PredictionError(
            f"{path}: no images found ({'any image file' if num_channels == 1 else 'names <case>_0000<ending>'}"
            f", endings: {', '.join(SUPPORTED_ENDINGS)}) and no DICOM series; name the files like the raw "
            "imagesTs/ folder, or pass a folder of DICOM series"
        )
    return sorted(cases, key=lambda case: case.case_id)


# ------------------------------------------------------------------------------------------- the stages
@dataclass
class _Loaded:
    case: InputCase
    geometry: Geometry
    data: np.ndarray | None  # dropped once the network has seen it
    properties: Any
    seconds: float


def _load(predictor: Predictor, case: InputCase) -> _Loaded:
    """Read + check + preprocess one case (runs in a worker thread)."""
    start = time.perf_counter()
    if case.problem:
        raise ImageReadError(case.problem)
    image, geometry = read_dicom_series(case.files) if case.dicom else read_image(case.files)
    predictor.check_image(image, geometry, name=str(case.files[0]))
    data, properties = predictor.preprocess(image, geometry, case_id=case.case_id)
    return _Loaded(case, geometry, data, properties, time.perf_counter() - start)


def _export(
    predictor: Predictor,
    loaded: _Loaded,
    log_probabilities: torch.Tensor,
    output: Path,
    save_probabilities: bool,
    postprocess: bool,
    output_format: str = "nifti",
) -> tuple[Path, float]:
    """Restore to the original grid slab by slab and write (runs in a worker thread). With
    ``save_probabilities`` the softmax goes, slab by slab too, into a float16 file-backed array that becomes
    ``<case>.npz`` (:func:`~autoseg.inference.outputs.probabilities_file`)."""
    start = time.perf_counter()
    case, geometry = loaded.case, loaded.geometry
    if save_probabilities:
        shape = (int(log_probabilities.shape[0]), *geometry.shape)
        with probabilities_file(output / f"{case.case_id}.npz", shape, geometry, case.ending) as probabilities:
            segmentation = predictor.restore_segmentation(log_probabilities, loaded.properties, probabilities)
    else:
        segmentation = predictor.restore_segmentation(log_probabilities, loaded.properties)
    if tuple(segmentation.shape) != tuple(geometry.shape):
        raise PredictionError(
            f"{case.files[0]}: restored prediction has shape {segmentation.shape}, the image "
            f"{geometry.shape}; this is a bug in preprocessing/restore, please report it"
        )
    if postprocess:
        segmentation = predictor.postprocess(segmentation)
    target = output / f"{case.case_id}{DICOM_SEG_ENDING if output_format == 'dicom-seg' else case.ending}"
    # a killed earlier run may have left this case's temporary file; this job owns the case (--part), so clear it
    remove_partial_files(output, [target.name, f"{case.case_id}.npz"])
    if output_format == "dicom-seg":
        write_dicom_seg(segmentation, geometry, case.files, predictor.plans.labels, target)
    else:
        write_segmentation(segmentation, geometry, target)
    return target, time.perf_counter() - start


def _reason(exc: BaseException) -> str:
    if isinstance(exc, AutosegError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _dicom_seg_cases(cases: list[InputCase], input: str | os.PathLike) -> list[InputCase]:
    """Check, before the model is loaded, that a DICOM-SEG can be written: highdicom is installed and the
    input holds DICOM series. Cases that are image files get a ``problem`` (a SEG must reference a series)."""
    require_dicom_seg_writer()
    if not any(case.dicom for case in cases):
        raise ConfigurationError(f"{input}: --output-format dicom-seg needs DICOM series as input, found only image "
                                 "files; use --output-format nifti")
    for case in cases:
        if not case.dicom and case.problem is None:
            case.problem = (f"{case.files[0]}: not a DICOM series, so there is no series for a DICOM-SEG to "
                            "reference; predict it with --output-format nifti")
    return cases


def select_part(cases: Sequence[InputCase], part: int, parts: int) -> list[InputCase]:
    """This job's share of the cases when ``parts`` jobs split one input folder: case ``i`` (in the sorted
    order of :func:`find_input_cases`) goes to part ``i % parts``. Disjoint, together complete, and the same
    on every machine, so a job array needs no coordination. Raises ConfigurationError unless
    ``0 <= part < parts``."""
    if parts < 1 or not 0 <= part < parts:
        raise ConfigurationError(
            f"--part {part} --parts {parts}: expected 0 <= part < parts with parts >= 1; use --part "
            f"0..{max(parts, 1) - 1} --parts {max(parts, 1)} (SLURM: --part $SLURM_ARRAY_TASK_ID, docs/cluster.md)"
        )
    return [case for index, case in enumerate(cases) if index % parts == part]


def check_output_folder(output: str | os.PathLike) -> Path:
    """Create ``output`` (with parents) and prove it writable with a probe file, before any case is predicted:
    a typo or a read-only share should cost seconds, not a night of predictions that cannot be saved."""
    folder = Path(output)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PredictionError(
            f"{folder}: cannot create the output folder ({exc.strerror or exc}); pass a writable -o folder"
        ) from exc
    try:
        handle, probe = tempfile.mkstemp(prefix=".autoseg-write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise PredictionError(
            f"{folder}: output folder is not writable ({exc.strerror or exc}); fix its permissions "
            "(chmod u+w) or pass another -o folder"
        ) from exc
    return folder


def predict(
    input: str | os.PathLike,
    output: str | os.PathLike,
    dataset: str | int | None = None,
    configuration: str | None = None,
    folds: Sequence[int | str] | None = None,
    root: str | os.PathLike | None = None,
    architecture: str | None = None,
    step_size: float = 0.5,
    mirror: bool = True,
    save_probabilities: bool = False,
    device: str = "auto",
    num_workers: int = 2,
    checkpoint: str = DEFAULT_CHECKPOINT,
    postprocess: bool = True,
    predictor: Predictor | None = None,
    mixed_precision: bool = True,
    part: int = 0,
    parts: int = 1,
    output_format: str = "nifti",
    bundle: str | os.PathLike | None = None,
) -> PredictReport:
    """Predict every case of ``input`` into ``output`` (docs/prediction.md).

    ``folds=None`` uses every trained fold. ``bundle``: a model bundle from ``autoseg export`` instead of
    ``dataset``/``configuration`` under the data root. ``predictor``: an already loaded model (then ``dataset``,
    ``configuration``, ``bundle``, ``folds``, ``architecture``, ``checkpoint``, ``device``, ``step_size`` and
    ``mirror`` are taken from it, and its own postprocessing rules are applied unless ``postprocess=False``).
    ``part``/``parts``: predict only this job's share of the cases (:func:`select_part`).
    ``output_format``: one of :data:`OUTPUT_FORMATS` (:func:`_dicom_seg_cases` for "dicom-seg").
    Returns a report; ``ok`` is False when any case failed.

    Concurrency: the calling thread runs the network, case after case. ``num_workers`` reader threads read
    and preprocess the next cases, ``num_workers`` writer threads restore and write the finished ones; each
    side holds at most ``num_workers`` cases (preprocessed images, resp. float16 network-grid
    log-probabilities), so memory is bounded; the network waits only when reading is slower than it, or
    when all writers are behind. Threads cannot outlive the process; on an error or Ctrl-C the queued work is
    cancelled and only the cases already running finish.
    """
    select_part([], int(part), int(parts))  # a bad --part/--parts stops before anything is created or loaded
    if output_format not in OUTPUT_FORMATS:
        raise ConfigurationError(f"--output-format {output_format}: unknown; use one of {', '.join(OUTPUT_FORMATS)}")
    # an input without a single image stops before the model loads (every image counts as some case with one
    # channel); the naming is checked against the model's channel count once it is loaded, below
    first_look = find_input_cases(input, num_channels=1)
    if output_format == "dicom-seg":
        _dicom_seg_cases(first_look, input)  # highdicom present, series in the input: before the model loads
    output = check_output_folder(output)
    if predictor is None:
        if folds is not None:
            folds = [int(f) if str(f).isdigit() else str(f) for f in folds]
        if bundle is not None:
            predictor = Predictor.from_bundle(bundle, folds=folds, device=device, step_size=step_size, mirror=mirror,
                                              mixed_precision=mixed_precision, postprocess=postprocess)
        elif dataset is None or configuration is None:
            raise ConfigurationError("predict needs the model: a bundle (-m model.zip) or a dataset and "
                                     "configuration (-d DATASET -c CONFIGURATION)")
        else:
            predictor = Predictor.from_folder(
                dataset, configuration, folds=folds, root=root, architecture=architecture, checkpoint=checkpoint,
                device=device, step_size=step_size, mirror=mirror, mixed_precision=mixed_precision,
                postprocess=postprocess,
            )
    if predictor.spill_directory is None:  # big network-grid results spill beside the outputs, not to a tmpfs /tmp
        predictor.spill_directory = output
    # up to 2 * workers + 1 results are alive at once (one per pending write, one in the network): each gets
    # its share of RESULTS_RAM_BYTES, above which it spills to disk
    predictor.result_ram_bytes = min(predictor.result_ram_bytes,
                                     RESULTS_RAM_BYTES // (2 * max(1, int(num_workers)) + 1))
    # the model's channel count decides how files are named (find_input_cases), so cases are found after it loads
    cases = select_part(find_input_cases(input, num_channels=predictor.plans.num_channels), int(part), int(parts))
    if output_format == "dicom-seg":
        cases = _dicom_seg_cases(cases, input)
    report = PredictReport(ok=True)
    workers = max(1, int(num_workers))
    log.info("predicting %d case(s)%s from %s into %s (%d fold(s), %s, mirror %s, step %.2f)",
             len(cases), f" (part {part} of {parts})" if parts > 1 else "", input, output,
             len(predictor.networks), predictor.device, predictor.mirror, predictor.step_size)

    def fail(case: InputCase, exc: BaseException) -> None:
        report.failures.append((case.case_id, _reason(exc)))
        log.error("%s: %s", case.case_id, _reason(exc))
        if not isinstance(exc, AutosegError):
            log.debug("traceback of %s", case.case_id, exc_info=exc)

    readers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autoseg-read")
    writers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autoseg-write")
    pending_loads: deque[tuple[InputCase, Future]] = deque()
    pending_writes: deque[tuple[InputCase, Future, float]] = deque()
    queue = iter(cases)

    def top_up() -> None:
        # read ahead at most `workers` cases: bounded memory, the network never waits for the disk
        while len(pending_loads) < workers:
            case = next(queue, None)
            if case is None:
                return
            pending_loads.append((case, readers.submit(_load, predictor, case)))

    def collect_write(block: bool) -> None:
        while pending_writes and (block or pending_writes[0][1].done()):
            case, future, network_seconds = pending_writes.popleft()
            try:
                target, write_seconds = future.result()
            except Exception as exc:  # noqa: BLE001 - every failure is reported per case
                fail(case, exc)
                continue
            report.written.append(target)
            total = report.seconds_per_case.get(case.case_id, 0.0) + write_seconds
            report.seconds_per_case[case.case_id] = total
            log.info("%s: %.1f s (network %.1f s) -> %s", case.case_id, total, network_seconds, target.name)

    progress = tqdm(total=len(cases), desc="predict", unit="case")
    finished = False
    try:
        top_up()
        while pending_loads:
            case, future = pending_loads.popleft()
            try:
                loaded = future.result()
            except Exception as exc:  # noqa: BLE001
                fail(case, exc)
                progress.update(1)
                top_up()
                continue
            top_up()
            start = time.perf_counter()
            try:
                log_probabilities = predictor.predict_log_probabilities(loaded.data)
            except Exception as exc:  # noqa: BLE001
                fail(case, exc)
                progress.update(1)
                continue
            loaded.data = None  # the preprocessed image is not needed for the restore: free it now
            network_seconds = time.perf_counter() - start
            report.seconds_per_case[case.case_id] = loaded.seconds + network_seconds
            # at most `workers` cases waiting to be written: memory stays bounded when writing is the
            # bottleneck (the network then waits here for the oldest write)
            while len(pending_writes) >= workers:
                collect_write(block=False)
                if len(pending_writes) >= workers:
                    pending_writes[0][1].exception()  # waits for the oldest write without raising
            pending_writes.append((case, writers.submit(
                _export, predictor, loaded, log_probabilities, output, save_probabilities, postprocess,
                output_format), network_seconds))
            del log_probabilities, loaded
            collect_write(block=False)
            progress.update(1)
        collect_write(block=True)
        finished = True
    finally:
        progress.close()
        # normal end: nothing is queued any more; on an error or Ctrl-C drop what has not started
        readers.shutdown(wait=True, cancel_futures=not finished)
        writers.shutdown(wait=True, cancel_futures=not finished)
    report.ok = not report.failures
    return report
