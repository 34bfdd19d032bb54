"""Check a raw dataset before anything is computed from it, and report every problem at once.

`verify_dataset` reads each case (one case at a time per worker process, so memory stays at one case per
worker) and collects :class:`Problem` entries: which file, what was expected, what was found and the fix.
Nothing in the dataset folder is ever written or changed. `autoseg verify` prints :meth:`VerifyReport.format`
and exits 1 when the report is not ok; the planner refuses to plan a dataset that does not verify.

What is checked (issue 2 item 6, issue 11 item 2), with the check names used in the report:

- ``dataset.json``: missing, invalid JSON, missing or malformed keys (via :func:`load_dataset_spec`). The files
  are still checked, with the file ending and channels inferred from the files and dataset.json's readable
  parts (label values and numTraining then go unchecked; the problem says so), so one typo in the JSON does
  not hide every other problem.
- ``folder layout``: imagesTr/ or labelsTr/ missing.
- ``empty dataset``: no training images and no labels.
- ``file ending``: a file whose ending is not dataset.json's ``file_ending``, also when it differs only in letter
  case (``.NII.GZ``): the case listing matches endings exactly, so such a file would silently be left out.
- ``case id letter case``: two case ids equal but for letter case (``Case_016`` images, ``case_016`` label): not
  one case on Linux, the same file name on macOS and Windows.
- ``file name``: an image file without the ``_CCCC`` channel suffix.
- ``image without label`` / ``label without image``.
- ``numTraining``: dataset.json's count disagrees with the label files.
- ``missing channel`` / ``unexpected channel``: channel files vs ``channel_names``.
- ``colour channels``: a natural image's colour components disagree with ``channel_names``. A single
  ``<case>_0000.png`` holding 3 colour channels is 3 channels when 3 channel names are declared (the
  natural-image convention of the nnU-Net raw format).
- ``unreadable file``: corrupt, truncated, 4D, or not an image.
- ``spacing``: zero or negative voxel spacing.
- ``shape mismatch``: channels or label on a different voxel grid size.
- ``geometry mismatch``: spacing, origin or direction differ beyond :data:`GEOMETRY_TOLERANCE`.
- ``NaN/Inf in image``.
- ``non-integer label``: a label file holding fractional values.
- ``undeclared label value``: label values that dataset.json's ``labels`` does not declare; a 0/255 label of a
  dataset whose labels stop before 255 is named as what it is, a binary mask saved as an 8-bit image.
- ``empty label`` (warning only): a training label with background only.
- ``mixed 2D/3D``: some cases 2D and others 3D.
- ``unused label`` (warning only): a declared label that no training case contains.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from autoseg.dataset.cases import IMAGES_TEST, IMAGES_TRAIN, LABELS_TRAIN
from autoseg.dataset.spec import DATASET_JSON, DatasetSpec, load_dataset_spec
from autoseg.errors import AutosegError, DatasetError
from autoseg.io import Geometry, file_ending, read_channels, read_segmentation
from autoseg.io.readers import ZERO_SPACING_MESSAGE
from autoseg.workers import pool_initializer

log = logging.getLogger(__name__)

ERROR = "error"
WARNING = "warning"

# Relative tolerance for spacing/origin/direction agreement between a case's files. Files converted between
# formats carry float32 geometry (about 7 significant digits), so 1e-4 ignores rounding while catching any
# real misregistration (a 0.1 mm shift on a 300 mm origin is 3e-4).
GEOMETRY_TOLERANCE = 1e-4

# The order in which checks are reported (dataset-level first, then per-file).
CHECK_ORDER = (
    "dataset.json",
    "folder layout",
    "empty dataset",
    "file ending",
    "file name",
    "case id letter case",
    "image without label",
    "label without image",
    "numTraining",
    "missing channel",
    "unexpected channel",
    "colour channels",
    "unreadable file",
    "spacing",
    "shape mismatch",
    "geometry mismatch",
    "NaN/Inf in image",
    "non-integer label",
    "undeclared label value",
    "empty label",
    "mixed 2D/3D",
    "unused label",
)

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Problem:
    """One problem: ``file`` (relative to the dataset folder), what was expected, what was found, the fix.

    ``severity`` is ``"error"`` (the dataset does not verify) or ``"warning"`` (worth a look, not fatal);
    ``check`` names the check that found it (one of :data:`CHECK_ORDER`).
    """

    file: str
    expected: str
    found: str
    fix: str
    severity: str = ERROR
    check: str = ""

    def format(self) -> str:
        return f"{self.severity.upper()} {self.file}: expected {self.expected}; found {self.found}. Fix: {self.fix}"


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_dataset`. ``ok`` is True when no problem is an error."""

    dataset_dir: Path
    num_training: int = 0
    num_test: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def checks_failed(self) -> list[str]:
        """Names of the checks with at least one error, in report order."""
        return sorted({p.check for p in self.errors}, key=_check_rank)

    def format(self) -> str:
        """The human report: every problem grouped by check, then a one-line summary."""
        lines = [f"Verifying {self.dataset_dir}"]
        groups: dict[str, list[Problem]] = {}
        for problem in self.problems:
            groups.setdefault(problem.check, []).append(problem)
        for check in sorted(groups, key=_check_rank):
            members = groups[check]
            lines.append(f"[{check}] {len(members)} problem{'s' if len(members) != 1 else ''}")
            lines.extend(f"  {p.format()}" for p in members)
        lines.append(self.summary())
        return "\n".join(lines)

    def summary(self) -> str:
        cases = (f"{self.num_training} training case{'s' if self.num_training != 1 else ''}, "
                 f"{self.num_test} test case{'s' if self.num_test != 1 else ''}")
        name = self.dataset_dir.name
        n_err, n_warn = len(self.errors), len(self.warnings)
        if self.ok:
            extra = f", {n_warn} warning{'s' if n_warn != 1 else ''}" if n_warn else ", no problems"
            return f"{name}: OK ({cases}{extra})"
        return (
            f"{name}: FAILED, {n_err} error{'s' if n_err != 1 else ''} and {n_warn} warning"
            f"{'s' if n_warn != 1 else ''} in check(s) {', '.join(self.checks_failed())} ({cases}); "
            "fix them and run `autoseg verify` again"
        )


def _check_rank(check: str) -> int:
    return CHECK_ORDER.index(check) if check in CHECK_ORDER else len(CHECK_ORDER)


# ------------------------------------------------------------------------------------------ pure helpers
def spacing_problem(spacing: Sequence[float]) -> str | None:
    """Describe a non-positive or non-finite spacing (mm, array order), or None when every axis is > 0."""
    bad = [i for i, s in enumerate(spacing) if not np.isfinite(s) or s <= 0]
    if not bad:
        return None
    return f"spacing {tuple(float(s) for s in spacing)} (axis {', '.join(map(str, bad))} not > 0)"


def geometry_differences(reference: Geometry, other: Geometry, tolerance: float = GEOMETRY_TOLERANCE) -> list[str]:
    """Spacing/origin/direction differences of ``other`` from ``reference`` beyond ``tolerance``.

    Spacing compares relatively (``rtol = atol = tolerance``, mm); origin relatively with an absolute floor of
    ``10 * tolerance`` mm so that an origin near 0 is not held to float precision; direction cosines (unitless)
    absolutely with ``10 * tolerance``. Shapes are not compared here (see the shape check). Returns [] when
    the two grids agree or have different dimensionality (the dimension check reports that).
    """
    if len(reference.spacing) != len(other.spacing) or len(reference.direction) != len(other.direction):
        return []
    differences = []
    if not np.allclose(other.spacing, reference.spacing, rtol=tolerance, atol=tolerance):
        differences.append(f"spacing {_fmt(other.spacing)} instead of {_fmt(reference.spacing)}")
    if not np.allclose(other.origin, reference.origin, rtol=tolerance, atol=10 * tolerance):
        differences.append(f"origin {_fmt(other.origin)} instead of {_fmt(reference.origin)}")
    if not np.allclose(other.direction, reference.direction, atol=10 * tolerance):
        differences.append(f"direction {_fmt(other.direction)} instead of {_fmt(reference.direction)}")
    return differences


def non_integer_values(values: np.ndarray, limit: int = 5) -> list[float]:
    """Up to ``limit`` distinct values of ``values`` that are not whole numbers (NaN/Inf included)."""
    if np.issubdtype(values.dtype, np.integer) or values.dtype == bool:
        return []
    flat = values.ravel()
    bad = flat[~np.isfinite(flat) | (np.floor(flat) != flat)]
    return [float(v) for v in np.unique(bad)[:limit]]


def count_non_finite(array: np.ndarray) -> tuple[int, int]:
    """``(number of NaN, number of +-Inf)`` values in ``array`` (any shape)."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0, 0
    n_nan = int(np.isnan(array).sum())
    return n_nan, int(np.isinf(array).sum())


def _nifti_non_finite(path: Path) -> tuple[int, int] | None:
    """NaN/Inf counts of a float NIfTI file as stored. ITK's NIfTI reader silently turns NaN and Inf into 0,
    so the array autoseg reads cannot show them; nibabel reads the stored values. None if nibabel cannot."""
    try:
        import nibabel

        image = nibabel.load(str(path))
        if not np.issubdtype(image.get_data_dtype(), np.floating):
            return 0, 0  # integer storage holds no NaN (a scale factor cannot create one from finite values)
        return count_non_finite(np.asanyarray(image.dataobj))
    except Exception:  # noqa: BLE001 - a file nibabel cannot parse was already judged by the ITK reader
        return None


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _values_text(values: Sequence[float], limit: int = 10) -> str:
    shown = ", ".join(f"{v:g}" for v in list(values)[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


# ------------------------------------------------------------------------------------------ per case
@dataclass(frozen=True)
class _CaseTask:
    """What a worker needs to check one case (all plain data: it crosses a process boundary)."""

    dataset_dir: str
    case_id: str
    channel_files: tuple[tuple[int, str], ...]  # (channel, path relative to the dataset folder)
    label_file: str | None
    spec: DatasetSpec
    image_folder: str
    check_label_values: bool = True  # False when dataset.json is broken: the declared labels are unknown


@dataclass
class _CaseResult:
    case_id: str
    problems: list[Problem]
    dims: int | None = None
    dims_file: str = ""
    label_values: tuple[int, ...] = ()
    is_training: bool = True


def _read_error_problem(rel: str, path: Path, exc: AutosegError, expected: str) -> Problem:
    """Turn an ImageReadError about ``path`` into a Problem; zero spacing gets its own check."""
    message = str(exc)
    if message.startswith(f"{path}: "):
        message = message[len(f"{path}: "):]  # the report names the file already
    if ZERO_SPACING_MESSAGE in message:
        return Problem(rel, "voxel spacing > 0 mm along every axis", "a header with zero spacing",
                       "write the true voxel spacing into the file's header (e.g. re-save it with SimpleITK "
                       "after SetSpacing)", check="spacing")
    if "dimensions" in message:
        fix = "split the file into one 2D/3D file per channel (Decathlon tasks: `autoseg convert-msd`)"
    elif "colour channels" in message:
        fix = "save the label map as a single-channel integer image"
    else:
        fix = "re-export or re-convert the file from its source; it may be truncated or not an image at all"
    return Problem(rel, expected, message, fix, check="unreadable file")


def _colour_problem(rel: str, components: int, spec: DatasetSpec, several_files: bool, identical: bool) -> Problem:
    """Explain a natural image whose colour channels disagree with dataset.json's channel_names."""
    names = ", ".join(spec.channel_names[c] for c in sorted(spec.channel_names))
    declared = f"{spec.num_channels} channel{'s' if spec.num_channels != 1 else ''} ({names})"
    kind = {3: "RGB", 4: "RGBA"}.get(components, "colour")
    found = f"{components} colour channels ({kind}) in this file"
    if identical:
        found += "; they are identical, so it is a grayscale image stored as colour"
    if several_files:
        expected = f"one channel per file: channel_names declares {declared} as separate _CCCC files"
        fix = (f"either store all {spec.num_channels} channels in this one colour _0000 file and delete the other "
               "channel files, or save each channel file as single-channel grayscale")
    elif spec.num_channels == 1:
        expected = f"a single-channel image: channel_names declares {declared}"
        fix = ("save the image as single-channel grayscale" if identical else
               f"declare {components} channel_names in dataset.json (e.g. "
               + ", ".join(f'"{i}": "{n}"' for i, n in enumerate("RGBA"[:components]))
               + ") to use the colour channels, or save the image as grayscale")
    elif components == 4 and spec.num_channels == 3:
        expected = f"{declared} in this colour file"
        fix = "remove the alpha channel (save as RGB), or declare a 4th channel name"
    else:
        expected = f"{declared} in this colour file (the natural-image convention: one _0000 file, one colour " \
                   "channel per declared channel)"
        fix = f"declare {components} channel_names in dataset.json or re-save the image with {spec.num_channels} " \
              "channels"
    return Problem(rel, expected, found, fix, check="colour channels")


def _check_case(task: _CaseTask) -> _CaseResult:
    """Read one case's channel files and label and report every problem found (never raises for bad data)."""
    root = Path(task.dataset_dir)
    spec = task.spec
    problems: list[Problem] = []
    result = _CaseResult(task.case_id, problems, is_training=task.image_folder == IMAGES_TRAIN)
    declared = set(range(spec.num_channels))
    present = [channel for channel, _ in task.channel_files]

    # Read every channel: geometry, colour components, NaN/Inf. One file in memory at a time.
    readable: list[tuple[str, Geometry, int]] = []  # (relative path, geometry, colour components)
    for channel, rel in task.channel_files:
        try:
            array, geometry = read_channels(root / rel)
        except AutosegError as exc:
            problems.append(_read_error_problem(rel, root / rel, exc, f"a readable {spec.file_ending} image"))
            continue
        components = array.shape[0]
        identical = components > 1 and all(np.array_equal(array[0], array[c]) for c in range(1, components))
        n_nan, n_inf = count_non_finite(array)
        if file_ending(rel) in (".nii", ".nii.gz"):
            n_nan, n_inf = _nifti_non_finite(root / rel) or (n_nan, n_inf)
        if n_nan or n_inf:
            problems.append(Problem(rel, "finite intensities in every voxel", f"{n_nan} NaN and {n_inf} Inf voxels",
                                    "replace them (e.g. with the image minimum) and save the file again",
                                    check="NaN/Inf in image"))
        del array
        bad_spacing = spacing_problem(geometry.spacing)
        if bad_spacing:
            problems.append(Problem(rel, "voxel spacing > 0 mm along every axis", bad_spacing,
                                    "write the true voxel spacing into the file's header", check="spacing"))
        if components > 1:
            convention = len(task.channel_files) == 1 and channel == 0 and components == spec.num_channels
            if not convention:
                problems.append(_colour_problem(rel, components, spec, len(task.channel_files) > 1, identical))
        readable.append((rel, geometry, components))

    # Channel files against channel_names. A single colour _0000 file stands for all declared channels; when its
    # colour count disagrees, the colour-channel problem above already explains it.
    single_colour = bool(present == [0] and readable and readable[0][2] > 1)
    if not single_colour:
        natural_hint = ""
        if present == [0] and spec.num_channels > 1 and readable and readable[0][2] == 1 and \
                file_ending(task.channel_files[0][1]) in (".png", ".bmp", ".tif", ".tiff"):
            natural_hint = f", or store the {spec.num_channels} channels as one colour image in _0000"
        for channel in sorted(declared - set(present)):
            rel = f"{task.image_folder}/{task.case_id}_{channel:04d}{spec.file_ending}"
            problems.append(Problem(
                rel, f"channel {channel} ('{spec.channel_names[channel]}') of case {task.case_id}",
                "no such file (the case has channel(s) " + (", ".join(f"{c:04d}" for c in present) or "none") + ")",
                f"add the missing channel file{natural_hint}", check="missing channel"))
    for channel in sorted(set(present) - declared):
        rel = dict(task.channel_files)[channel]
        problems.append(Problem(
            rel, f"channels 0000..{spec.num_channels - 1:04d} as declared in dataset.json channel_names",
            f"channel {channel:04d}, which is not declared",
            "declare the channel in dataset.json channel_names or remove the file", check="unexpected channel"))

    # Channels must share one voxel grid.
    if readable:
        first_rel, reference, _ = readable[0]
        result.dims, result.dims_file = reference.dims, first_rel
        for rel, geometry, _ in readable[1:]:
            _compare_grids(problems, rel, geometry, first_rel, reference)
    else:
        reference = None

    # The label: integer values declared in dataset.json, on the image grid.
    if task.label_file is not None:
        rel = task.label_file
        try:
            label, label_geometry = read_segmentation(root / rel)
        except AutosegError as exc:
            problems.append(_read_error_problem(rel, root / rel, exc, f"a readable single-channel {spec.file_ending} label map"))
        else:
            fractional = non_integer_values(label)
            if fractional:
                problems.append(Problem(
                    rel, "whole-number label values", f"values {_values_text(fractional)} (stored as {label.dtype})",
                    "round/threshold the label map and save it with an integer type (uint8)", check="non-integer label"))
                label = np.nan_to_num(np.round(label), nan=-1, posinf=-1, neginf=-1)
            values, counts = np.unique(label, return_counts=True)
            result.label_values = tuple(int(v) for v in values)
            if result.label_values == (0,):
                problems.append(Problem(
                    rel, "some foreground (a declared label other than background)", "label has no foreground: "
                    "every voxel is background 0", "check that the right label file was exported; a case without "
                    "the structure is fine to keep, it trains as a negative example", severity=WARNING,
                    check="empty label"))
            # declared = background, classes or region members, and the ignore value
            declared = set(spec.label_values)
            undeclared = [(int(v), int(n)) for v, n in zip(values, counts) if int(v) not in declared]
            if not task.check_label_values:
                undeclared = []
            if task.check_label_values and _is_8bit_mask(result.label_values, spec):
                problems.append(Problem(
                    rel, f"only the values {spec.label_values} declared in dataset.json labels",
                    f"labels are 0/255: a binary mask saved as 8-bit image ({dict(undeclared)[255]} voxels of 255)",
                    "map 255 to 1 (label[label == 255] = 1) and save the label again", check="undeclared label value"))
            elif undeclared:
                problems.append(Problem(
                    rel, f"only the values {spec.label_values} declared in dataset.json labels",
                    "undeclared value(s) " + ", ".join(f"{v} ({n} voxels)" for v, n in undeclared),
                    "relabel those voxels, or declare the values in dataset.json 'labels' (consecutive from 0)",
                    check="undeclared label value"))
            del label
            if reference is not None:
                _compare_grids(problems, rel, label_geometry, first_rel, reference)
            else:
                result.dims, result.dims_file = label_geometry.dims, rel
    return result


def _is_8bit_mask(values: Sequence[int], spec: DatasetSpec) -> bool:
    """A label holding 0 and 255 (and nothing else undeclared) where dataset.json declares far fewer labels:
    the usual result of saving a binary mask as an 8-bit image (white = 255)."""
    undeclared = {v for v in values if v not in spec.label_values}
    return undeclared == {255} and 0 in values and max(spec.label_values) < 255


def _compare_grids(problems: list[Problem], rel: str, geometry: Geometry, reference_rel: str,
                   reference: Geometry) -> None:
    if geometry.shape != reference.shape:
        problems.append(Problem(
            rel, f"shape {reference.shape} like {Path(reference_rel).name}", f"shape {geometry.shape}",
            "resample or re-export the file onto the same voxel grid as the case's other files",
            check="shape mismatch"))
        return
    differences = geometry_differences(reference, geometry)
    if differences:
        problems.append(Problem(
            rel, f"the geometry of {Path(reference_rel).name} (tolerance {GEOMETRY_TOLERANCE:g})", "; ".join(differences),
            "copy the geometry from the first channel (e.g. SimpleITK CopyInformation) if the voxels are aligned, "
            "otherwise resample onto its grid", check="geometry mismatch"))


# ------------------------------------------------------------------------------------------ dataset level
def _list_folder(dataset_dir: Path, folder: str, spec: DatasetSpec, problems: list[Problem]) -> list[Path]:
    """Files in ``folder`` with the declared ending; reports files with another ending. Hidden files
    (``.DS_Store``, macOS ``._*`` resource forks) are ignored, as every reader of the dataset ignores them."""
    path = dataset_dir / folder
    if not path.is_dir():
        return []
    kept = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith(".") or entry.is_dir():
            continue
        ending = file_ending(entry)
        if ending == spec.file_ending.lower() and not entry.name.endswith(spec.file_ending):
            actual = entry.name[len(entry.name) - len(spec.file_ending):]
            stem = entry.name[: len(entry.name) - len(spec.file_ending)]
            problems.append(Problem(
                f"{folder}/{entry.name}", f"'{spec.file_ending}' (dataset.json file_ending), in the same letter case",
                f"'{actual}': autoseg lists files by their exact ending, so this case would be left out",
                f"rename it to {stem}{spec.file_ending}", check="file ending"))
            continue
        if ending != spec.file_ending:
            found = f"'{ending}'" if ending else f"'{''.join(entry.suffixes) or entry.name}' (not an image format autoseg reads)"
            fix = (f"convert the file to {spec.file_ending}" + (f", or set file_ending to '{ending}' in dataset.json "
                   "if every file uses it" if ending else "") + ", or move it out of the dataset folder")
            problems.append(Problem(f"{folder}/{entry.name}", f"'{spec.file_ending}' (dataset.json file_ending)",
                                    found, fix, check="file ending"))
            continue
        kept.append(entry)
    return kept


def _group_images(files: list[Path], folder: str, spec: DatasetSpec,
                  problems: list[Problem]) -> dict[str, dict[int, str]]:
    groups: dict[str, dict[int, str]] = {}
    for entry in files:
        stem = entry.name[: -len(spec.file_ending)]
        match = _CHANNEL_SUFFIX.match(stem)
        if not match:
            problems.append(Problem(
                f"{folder}/{entry.name}", f"<case>_<CCCC>{spec.file_ending} (a 4-digit channel index, e.g. "
                f"{stem}_0000{spec.file_ending})", f"'{entry.name}' without a channel index",
                f"rename it to {stem}_0000{spec.file_ending} (and _0001, ... for further channels)", check="file name"))
            continue
        groups.setdefault(match.group("case"), {})[int(match.group("channel"))] = f"{folder}/{entry.name}"
    return groups


def _letter_case_problems(images: dict[str, dict[int, str]], labels: dict[str, str], spec: DatasetSpec,
                          problems: list[Problem]) -> None:
    """Case ids that are equal but for letter case: a mismatched image/label pair, or two cases whose files
    would be one file on a case-insensitive filesystem (macOS, Windows)."""
    by_folded: dict[str, set[str]] = {}
    for case_id in set(images) | set(labels):
        by_folded.setdefault(case_id.casefold(), set()).add(case_id)
    for spellings in (sorted(v) for _, v in sorted(by_folded.items()) if len(v) > 1):
        where = [f"{IMAGES_TRAIN}/{c}_0000{spec.file_ending}" if c in images else f"{LABELS_TRAIN}/{c}{spec.file_ending}"
                 for c in spellings]
        problems.append(Problem(
            where[0], "one spelling per case id, the same in imagesTr/ and labelsTr/",
            f"case ids {', '.join(repr(c) for c in spellings)} differ only in letter case ({', '.join(where)})",
            "rename the files so that each case's images and label use exactly the same case id, and no two cases "
            "differ only in letter case", check="case id letter case"))


def _dataset_problems(dataset_dir: Path, spec: DatasetSpec, problems: list[Problem],
                      check_label_values: bool = True) -> list[_CaseTask]:
    """Layout-level checks; returns one task per case to read. ``check_label_values=False`` (dataset.json
    unreadable, ``spec`` inferred): label values and numTraining are not compared with it."""
    check_num_training = check_label_values
    for folder in (IMAGES_TRAIN, LABELS_TRAIN):
        if not (dataset_dir / folder).is_dir():
            problems.append(Problem(f"{folder}/", "a folder", "nothing",
                                    f"create {folder}/ in {dataset_dir} (layout: dataset_templates/README.md)",
                                    check="folder layout"))
    images = _group_images(_list_folder(dataset_dir, IMAGES_TRAIN, spec, problems), IMAGES_TRAIN, spec, problems)
    labels = {p.name[: -len(spec.file_ending)]: f"{LABELS_TRAIN}/{p.name}"
              for p in _list_folder(dataset_dir, LABELS_TRAIN, spec, problems)}
    tests = _group_images(_list_folder(dataset_dir, IMAGES_TEST, spec, problems), IMAGES_TEST, spec, problems)

    if not images and not labels:
        problems.append(Problem(f"{IMAGES_TRAIN}/, {LABELS_TRAIN}/", f"training cases (<case>_0000{spec.file_ending} "
                                f"with <case>{spec.file_ending})", "no image or label files",
                                "put the training images and labels there (see dataset_templates/README.md)",
                                check="empty dataset"))
    _letter_case_problems(images, labels, spec, problems)
    for case_id in sorted(set(images) - set(labels)):
        if case_id.casefold() in {c.casefold() for c in labels}:
            continue  # reported by the letter-case check
        problems.append(Problem(
            f"{LABELS_TRAIN}/{case_id}{spec.file_ending}", f"the label of {IMAGES_TRAIN}/{case_id}_0000{spec.file_ending}",
            "no such file", f"add the label, or move the case's images to {IMAGES_TEST}/ if it has none",
            check="image without label"))
    for case_id in sorted(set(labels) - set(images)):
        if case_id.casefold() in {c.casefold() for c in images}:
            continue  # reported by the letter-case check
        problems.append(Problem(
            labels[case_id], f"images {IMAGES_TRAIN}/{case_id}_0000{spec.file_ending} ...", "a label without images",
            "add the case's image files or remove the label", check="label without image"))
    if spec.num_training != len(labels) and (images or labels) and check_num_training:
        problems.append(Problem(DATASET_JSON, f"numTraining = the number of label files in {LABELS_TRAIN}/ ({len(labels)})",
                                f"numTraining {spec.num_training}", f"set \"numTraining\": {len(labels)} in dataset.json",
                                check="numTraining"))

    tasks = []
    for case_id in sorted(set(images) | set(labels)):
        channels = tuple(sorted(images.get(case_id, {}).items()))
        tasks.append(_CaseTask(str(dataset_dir), case_id, channels, labels.get(case_id), spec, IMAGES_TRAIN,
                               check_label_values))
    for case_id, channels in sorted(tests.items()):
        tasks.append(_CaseTask(str(dataset_dir), case_id, tuple(sorted(channels.items())), None, spec, IMAGES_TEST))
    return tasks


def _run_cases(tasks: list[_CaseTask], num_workers: int) -> list[_CaseResult]:
    """Check cases in a bounded process pool (each worker holds one case at a time), with a progress bar."""
    progress = dict(total=len(tasks), desc="verify", unit="case", disable=None)
    if num_workers <= 1 or len(tasks) <= 1:
        return [_check_case(task) for task in tqdm(tasks, **progress)]
    # spawn: workers start clean, safe even when the caller has threads (torch, tqdm) running.
    context = multiprocessing.get_context("spawn")
    initializer, initargs = pool_initializer()  # workers die with this process, even on kill -9
    with context.Pool(min(num_workers, len(tasks)), initializer=initializer, initargs=initargs) as pool:
        return list(tqdm(pool.imap(_check_case, tasks, chunksize=1), **progress))


def _dimension_problems(results: list[_CaseResult]) -> list[Problem]:
    """Every case must be 2D or every case 3D; the minority is reported file by file."""
    dims = Counter(r.dims for r in results if r.dims is not None)
    if len(dims) <= 1:
        return []
    majority, count = dims.most_common(1)[0]
    return [
        Problem(r.dims_file, f"{majority}D like the other {count} cases", f"a {r.dims}D image",
                f"keep one dimensionality per dataset: convert this case to {majority}D or move it to its own dataset",
                check="mixed 2D/3D")
        for r in results if r.dims is not None and r.dims != majority
    ]


def _inferred_spec(dataset_dir: Path) -> DatasetSpec | None:
    """A stand-in for an unreadable dataset.json, to check the files with: its ``file_ending`` when that part
    is usable, else the most common supported ending in imagesTr/ and labelsTr/; as many channels as the
    highest ``_CCCC`` index seen; background as the only label (label values are not checked against it).
    None when the folders hold no image file at all."""
    import json

    from autoseg.io import SUPPORTED_ENDINGS

    try:
        data = json.loads((dataset_dir / DATASET_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    data = data if isinstance(data, dict) else {}
    files = [p for folder in (IMAGES_TRAIN, LABELS_TRAIN) if (dataset_dir / folder).is_dir()
             for p in sorted((dataset_dir / folder).iterdir()) if not p.name.startswith(".")]
    declared = data.get("file_ending")
    if isinstance(declared, str) and declared.lower() in SUPPORTED_ENDINGS:
        ending = declared
    else:
        endings = Counter(file_ending(p) for p in files if file_ending(p))
        if not endings:
            return None
        ending = endings.most_common(1)[0][0]
    channels = [int(m.group("channel")) for p in files if p.name.lower().endswith(ending.lower())
                for m in [_CHANNEL_SUFFIX.match(p.name[: -len(ending)])] if m]
    names = data.get("channel_names")
    if isinstance(names, dict) and names and all(str(k).isdigit() for k in names):
        channel_names = {int(k): str(v) for k, v in names.items()}
    else:
        channel_names = {c: f"channel {c}" for c in range(max(channels, default=0) + 1)}
    return DatasetSpec(channel_names=channel_names, labels={"background": 0}, num_training=0, file_ending=ending)


def verify_dataset(raw_dir: str | os.PathLike, num_workers: int = 2) -> VerifyReport:
    """Check the raw dataset in ``raw_dir`` and return every problem found; the folder is never modified.

    ``num_workers`` processes read cases in parallel (1 = in this process). Raises nothing for a bad
    dataset (that is what the report is for); raises DatasetError only when ``raw_dir`` is not a folder.
    """
    dataset_dir = Path(raw_dir).resolve()
    if not dataset_dir.is_dir():
        raise DatasetError(f"{dataset_dir}: not a folder; expected a raw dataset folder with dataset.json, "
                           "imagesTr/ and labelsTr/; check the dataset name or --root")
    report = VerifyReport(dataset_dir)
    spec_known = True
    try:
        spec = load_dataset_spec(dataset_dir)
    except DatasetError as exc:
        message = str(exc).split(f"{dataset_dir / DATASET_JSON}: ", 1)[-1]
        spec, spec_known = _inferred_spec(dataset_dir), False
        also = ("" if spec is None else f"; the files below were still checked, with file ending '{spec.file_ending}' "
                f"and {spec.num_channels} channel(s) inferred from them (label values and numTraining unchecked)")
        report.problems.append(Problem(DATASET_JSON, "a valid dataset.json (template: dataset_templates/README.md)",
                                       message, f"correct dataset.json as the message says{also}", check="dataset.json"))
        if spec is None:
            return report

    tasks = _dataset_problems(dataset_dir, spec, report.problems, check_label_values=spec_known)
    report.num_training = sum(t.image_folder == IMAGES_TRAIN for t in tasks)
    report.num_test = len(tasks) - report.num_training
    log.debug("verifying %d cases of %s with %d workers", len(tasks), dataset_dir, num_workers)
    results = _run_cases(tasks, num_workers)
    for result in results:
        report.problems.extend(result.problems)
    report.problems.extend(_dimension_problems(results))

    seen = {v for r in results if r.is_training for v in r.label_values}
    if seen and spec_known:
        for value in spec.foreground_labels:  # an unused ignore value is fine: a fully annotated dataset
            if value not in seen:
                report.problems.append(Problem(
                    DATASET_JSON, f"label '{spec.label_name(value)}' ({value}) present in some training case",
                    "it in no label file", "remove the label from dataset.json (keeping values consecutive) or check "
                    "the label files", severity=WARNING, check="unused label"))
    report.problems.sort(key=lambda p: (_check_rank(p.check), p.file))
    return report
