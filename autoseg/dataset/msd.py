"""Convert a Medical Segmentation Decathlon task folder into autoseg's raw layout.

An MSD task (``TaskXX_Name/``) has a dataset.json with ``modality`` ({"0": "MRI", ...}) and ``labels``
({"0": "background", "1": "...", ...}), and its multi-modal images are single 4D NIfTI files (x, y, z,
modality). The raw layout wants one 3D file per channel (``<case>_0000.nii.gz``, ...), labels as name -> value
and ``channel_names``. Each channel is cut out of the 4D image with SimpleITK's Extract, keeping the 3D part of
spacing, origin and direction (the 4th axis is the modality index, not space). Labels are copied unchanged.

The conversion writes into a hidden temporary folder next to the target and renames it into place at the end,
so an interrupted conversion never leaves a half-written dataset behind.

``--regions`` (BraTS-like tasks, e.g. Task01_BrainTumour: 4 channels, labels 0 background, 1 oedema,
2 non-enhancing tumour, 3 enhancing tumour) declares the BraTS evaluation regions instead of the three
classes, with the label files unchanged: "whole tumour" [1, 2, 3], "tumour core" [2, 3], "enhancing tumour"
[3], ``regions_class_order`` [1, 2, 3] (a voxel predicted in all three is painted 3, in whole and core 2, in
whole only 1, which gives back the original values). A task with another channel count or label set is
refused: its label values would not mean these regions.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from tqdm import tqdm

from autoseg.dataset.cases import IMAGES_TEST, IMAGES_TRAIN, LABELS_TRAIN
from autoseg.dataset.spec import DATASET_JSON, parse_dataset_spec, write_dataset_json
from autoseg.errors import DatasetError
from autoseg.paths import dataset_folder_name, raw_root
from autoseg.workers import pool_initializer

log = logging.getLogger(__name__)

MSD_ENDING = ".nii.gz"
_TASK_FOLDER = re.compile(r"^Task(\d+)_(.+)$")
_VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
# Keys of the MSD dataset.json worth keeping (provenance and licence travel with the data).
_PROVENANCE_KEYS = ("reference", "licence", "license", "release")  # not tensorImageSize: "4D" stops being true
# --regions: the BraTS regions over MSD Task01's values (key order = region order = paint order)
BRATS_REGIONS = {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": [3]}
BRATS_REGIONS_CLASS_ORDER = [1, 2, 3]
BRATS_CHANNELS = 4


@dataclass(frozen=True)
class _CaseJob:
    """One case to convert (plain data: it crosses a process boundary)."""

    case_id: str
    image: str
    label: str | None
    image_out: str
    label_out: str | None
    num_channels: int


def task_number_and_name(task_dir: str | os.PathLike) -> tuple[int, str] | None:
    """``Task04_Hippocampus`` -> ``(4, "Hippocampus")``; None for folder names not in the MSD form."""
    match = _TASK_FOLDER.match(Path(task_dir).name)
    return (int(match.group(1)), match.group(2)) if match else None


def msd_to_dataset_json(msd: dict[str, Any], num_training: int, source: str) -> dict[str, Any]:
    """Translate an MSD dataset.json into ours: ``modality`` -> ``channel_names``, ``labels`` {"1": "name"} ->
    {"name": 1}, ``numTraining`` counted from the converted files, ``file_ending`` ``.nii.gz``."""
    for key in ("modality", "labels"):
        if not isinstance(msd.get(key), dict) or not msd[key]:
            raise DatasetError(f"{source}: expected an MSD dataset.json with a '{key}' object; found "
                               f"{type(msd.get(key)).__name__}; is this a Medical Segmentation Decathlon task folder?")
    try:
        channel_names = {str(int(k)): str(v) for k, v in sorted(msd["modality"].items(), key=lambda kv: int(kv[0]))}
        labels: dict[str, int] = {}
        for value, name in sorted(msd["labels"].items(), key=lambda kv: int(kv[0])):
            if str(name) in labels:
                raise DatasetError(f"{source}: label name '{name}' is used for values {labels[str(name)]} and "
                                   f"{value}; expected one name per value; rename one of them in the task's dataset.json")
            labels[str(name)] = int(value)
    except ValueError as exc:
        raise DatasetError(f"{source}: 'modality' and 'labels' keys must be integers (\"0\", \"1\", ...); "
                           f"found {list(msd['modality'])} / {list(msd['labels'])}; fix the task's dataset.json") from exc
    converted: dict[str, Any] = {
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": num_training,
        "file_ending": MSD_ENDING,
        "name": str(msd.get("name", "")),
        "description": str(msd.get("description", "")),
    }
    for key in _PROVENANCE_KEYS:
        if key in msd:
            converted[key] = msd[key]
    return converted


def to_brats_regions(converted: dict[str, Any], source: str) -> dict[str, Any]:
    """``converted`` (our dataset.json of an MSD task) with the BraTS regions as its labels; DatasetError
    when the task is not BraTS-like (4 channels, label values exactly 0..3)."""
    values = sorted(converted["labels"].values())
    channels = len(converted["channel_names"])
    if channels != BRATS_CHANNELS or values != [0, 1, 2, 3]:
        raise DatasetError(f"{source}: --regions fits BraTS-like tasks (4 channels, labels 0-3 = background, "
                           f"oedema, non-enhancing, enhancing), found {channels} channel(s) and labels {values}; "
                           "convert this task without --regions")
    return {**converted, "labels": dict(BRATS_REGIONS), "regions_class_order": list(BRATS_REGIONS_CLASS_ORDER)}


def split_channels(image: sitk.Image, num_channels: int, source: str) -> list[sitk.Image]:
    """The 3D channels of an MSD image: a 3D image is one channel, a 4D one is cut along its 4th axis.

    Each 3D channel keeps the first three axes' spacing, origin and the 3x3 upper-left block of the direction
    matrix (``DIRECTIONCOLLAPSETOSUBMATRIX``); pixel type is kept.
    """
    dims = image.GetDimension()
    if dims == 3:
        if num_channels != 1:
            raise DatasetError(f"{source}: expected a 4D image with {num_channels} modalities (dataset.json "
                               "'modality'); found a 3D image; check the task's dataset.json")
        return [image]
    if dims != 4:
        raise DatasetError(f"{source}: expected a 3D or 4D NIfTI image; found {dims}D; this file is not an MSD image")
    size = list(image.GetSize())
    if size[3] != num_channels:
        raise DatasetError(f"{source}: expected {num_channels} modalities along the 4th axis (dataset.json "
                           f"'modality'); found {size[3]}; check the task's dataset.json")
    extractor = sitk.ExtractImageFilter()
    extractor.SetSize(size[:3] + [0])  # size 0 on an axis drops that axis
    extractor.SetDirectionCollapseToStrategy(sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    channels = []
    for channel in range(num_channels):
        extractor.SetIndex([0, 0, 0, channel])
        try:
            channels.append(extractor.Execute(image))
        except RuntimeError as exc:
            raise DatasetError(f"{source}: cannot split channel {channel} ({str(exc).strip().splitlines()[-1]}); "
                               "expected a 4D image whose first three axes are spatial") from exc
    return channels


def _convert_case(job: _CaseJob) -> str:
    """Write one case's channel files (and copy its label). Runs in a worker process."""
    try:
        header = sitk.ImageFileReader()
        header.SetFileName(job.image)
        header.ReadImageInformation()
        if header.GetDimension() == 3 and job.num_channels == 1:
            # Already one 3D channel: copy the bytes, which keeps data and geometry exactly and is fastest.
            shutil.copyfile(job.image, Path(job.image_out) / f"{job.case_id}_0000{MSD_ENDING}")
            image = None
        else:
            image = sitk.ReadImage(job.image)
    except RuntimeError as exc:
        raise DatasetError(f"{job.image}: cannot be read ({str(exc).strip().splitlines()[-1]}); expected a NIfTI "
                           "image; replace the corrupt file from the original download") from exc
    for channel, volume in enumerate(split_channels(image, job.num_channels, job.image) if image else []):
        sitk.WriteImage(volume, str(Path(job.image_out) / f"{job.case_id}_{channel:04d}{MSD_ENDING}"), useCompression=True)
    if job.label is not None and job.label_out is not None:
        shutil.copyfile(job.label, Path(job.label_out) / f"{job.case_id}{MSD_ENDING}")
    return job.case_id


def _visible_niftis(folder: Path) -> list[Path]:
    """The .nii.gz files of ``folder``, skipping hidden files such as macOS ``._*`` resource forks."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(MSD_ENDING) and not p.name.startswith(".")
                  and p.is_file())


def _jobs(task_dir: Path, tmp: Path, num_channels: int) -> tuple[list[_CaseJob], int]:
    images = _visible_niftis(task_dir / IMAGES_TRAIN)
    jobs = []
    for image in images:
        case_id = image.name[: -len(MSD_ENDING)]
        label = task_dir / LABELS_TRAIN / image.name
        if not label.is_file():
            raise DatasetError(f"{label}: not found; expected the label of {image} in the MSD task; add it or "
                               f"remove the image from {IMAGES_TRAIN}/")
        jobs.append(_CaseJob(case_id, str(image), str(label), str(tmp / IMAGES_TRAIN), str(tmp / LABELS_TRAIN),
                             num_channels))
    num_training = len(jobs)
    for image in _visible_niftis(task_dir / IMAGES_TEST):
        jobs.append(_CaseJob(image.name[: -len(MSD_ENDING)], str(image), None, str(tmp / IMAGES_TEST), None,
                             num_channels))
    return jobs, num_training


def _run(jobs: list[_CaseJob], num_workers: int) -> None:
    progress = dict(total=len(jobs), desc="convert-msd", unit="case", disable=None)
    if num_workers <= 1 or len(jobs) <= 1:
        for job in tqdm(jobs, **progress):
            _convert_case(job)
        return
    context = multiprocessing.get_context("spawn")  # clean workers, safe when the caller runs threads
    initializer, initargs = pool_initializer()  # workers die with this process, even on kill -9
    with context.Pool(min(num_workers, len(jobs)), initializer=initializer, initargs=initargs) as pool:
        for _ in tqdm(pool.imap_unordered(_convert_case, jobs, chunksize=1), **progress):
            pass


def convert_msd(task_dir: str | os.PathLike, root: str | os.PathLike | None = None, number: int | None = None,
                name: str | None = None, overwrite: bool = False, num_workers: int = 2, regions: bool = False) -> Path:
    """Convert the MSD task in ``task_dir`` into ``<root>/raw/DatasetXXX_Name`` and return that folder.

    ``number``/``name`` default to the task folder's (``Task04_Hippocampus`` -> 4, ``Hippocampus``). Refuses
    to replace an existing dataset unless ``overwrite``. ``num_workers`` processes convert cases in parallel.
    The task folder is only read. ``regions``: declare the BraTS regions (module docstring); refused with a
    DatasetError for a task they do not fit, before anything is written.
    """
    task_dir = Path(task_dir).expanduser().resolve()
    msd_json = task_dir / DATASET_JSON
    if not msd_json.is_file():
        raise DatasetError(f"{msd_json}: not found; expected a Medical Segmentation Decathlon task folder "
                           "(TaskXX_Name with dataset.json, imagesTr/, labelsTr/); check the path")
    parsed = task_number_and_name(task_dir)
    if number is None:
        if parsed is None:
            raise DatasetError(f"{task_dir}: folder name is not TaskXX_Name, so the dataset number is unknown; "
                               "pass --number N (and --name NAME)")
        number = parsed[0]
    if name is None:
        name = parsed[1] if parsed else task_dir.name
    if not _VALID_NAME.match(name):
        raise DatasetError(f"dataset name '{name}': expected letters, digits, '_' or '-' only; pass --name NAME")
    target = raw_root(root) / dataset_folder_name(number, name)
    if target.exists() and not overwrite:
        raise DatasetError(f"{target}: already exists; expected a new dataset folder; pass --overwrite to replace "
                           "it, or --number/--name to convert under another name")
    try:
        with open(msd_json, encoding="utf-8") as handle:
            msd = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{msd_json}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; "
                           "fix the file") from exc
    if not isinstance(msd, dict) or "modality" not in msd:
        raise DatasetError(f"{msd_json}: expected an MSD dataset.json with 'modality'; found keys "
                           f"{sorted(msd) if isinstance(msd, dict) else type(msd).__name__}; for a dataset "
                           "already in the raw layout, put it under raw/ directly")
    num_channels = len(msd["modality"]) if isinstance(msd["modality"], dict) else 0

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        jobs, num_training = _jobs(task_dir, tmp, num_channels)
        if num_training == 0:
            raise DatasetError(f"{task_dir / IMAGES_TRAIN}: expected training images *{MSD_ENDING}; found none; "
                               "check the task folder")
        listed = msd.get("numTraining")
        if isinstance(listed, int) and listed != num_training:
            log.warning("%s says numTraining %d but %s/ holds %d images; using the files", msd_json, listed,
                        IMAGES_TRAIN, num_training)
        dataset_json = msd_to_dataset_json(msd, num_training, str(msd_json))
        if regions:
            dataset_json = to_brats_regions(dataset_json, str(msd_json))
        parse_dataset_spec(dataset_json, str(msd_json))  # fail before any conversion work
        for folder in {Path(j.image_out) for j in jobs} | {Path(j.label_out) for j in jobs if j.label_out}:
            folder.mkdir(parents=True, exist_ok=True)
        log.info("converting %d training and %d test cases of %s", num_training, len(jobs) - num_training, task_dir.name)
        _run(jobs, num_workers)
        dataset_json["description"] = (dataset_json["description"] + f" (converted from {task_dir.name})").strip()
        write_dataset_json(tmp / DATASET_JSON, dataset_json)  # key order kept: it is the region order
        if target.exists():  # overwrite: move the old one aside first so the swap is two renames
            old = target.parent / f".{target.name}.replaced-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
