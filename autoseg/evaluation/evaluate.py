"""`autoseg evaluate`: compare a folder of predicted segmentations with a folder of references.

Cases are matched by file name (``<case><file_ending>`` in both folders). Every case is read with its
geometry; a prediction whose grid differs from its reference (shape, spacing, origin or direction, via
:meth:`autoseg.io.Geometry.mismatch`) is reported for that case: a shape difference makes the case
unevaluable, any other difference is evaluated on the reference spacing and flagged, because a lost affine is
the classic silent bug of this field. Either makes ``ok`` False.

``summary.json`` (schema version 1)::

    {"schema_version": 1, "ok": bool, "prediction_dir", "reference_dir", "file_ending", "labels": [1, 2],
     "label_names": {"1": "liver"}, "tolerance_mm": 1.0,
     "per_case": [{"case_id", "prediction", "reference", "geometry_mismatch": [str], "error": str | null,
                   "metrics": {"1": {"dice": ..., "iou": ..., "hd95": ..., "nsd": ..., ...}}}],
     "mean": {"1": {"dice": ..., "n": cases}}, "foreground_mean": {"dice": ...},
     "problems": [str], "regions": {"1": [1, 2, 3]}, "ignore_value": 4 | null}

Region datasets (dataset.json labels that are lists): the keys ``"1"``, ``"2"``, ... are the regions in
dataset.json order (``regions`` gives each key's label values, ``label_names`` its name), and both maps are
turned into region masks before comparing. Plain datasets: the keys are the label values and ``regions`` is
empty. ``ignore_value``: voxels the reference marks with it are left out of every metric
(:mod:`autoseg.evaluation.metrics` says how). Both fields are absent from summaries written before them.
"""
from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from autoseg.dataset.labels import LabelScheme
from autoseg.errors import AutosegError, DatasetError, ImageReadError
from autoseg.evaluation.parallel import run_all
from autoseg.fileio import read_json, write_json
from autoseg.io import SUPPORTED_ENDINGS, file_ending as ending_of, read_segmentation

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
SUMMARY_SCHEMA_VERSION = 1


@dataclass
class EvaluationSummary:
    """Result of evaluating a set of cases.

    ``per_case``: one dict per case (see the module docstring); ``mean``: ``{label (str): {metric: mean, "n"}}``
    over the evaluated cases; ``foreground_mean``: ``{metric: mean over the foreground labels}``.
    """

    ok: bool
    per_case: list[dict[str, Any]]
    mean: dict[str, dict[str, Any]]
    foreground_mean: dict[str, Any] = field(default_factory=dict)
    labels: list[int] = field(default_factory=list)
    label_names: dict[str, str] = field(default_factory=dict)
    tolerance_mm: float = 1.0
    problems: list[str] = field(default_factory=list)
    prediction_dir: str = ""
    reference_dir: str = ""
    file_ending: str = ""
    regions: dict[str, list[int]] = field(default_factory=dict)  # key -> label values (region datasets)
    ignore_value: int | None = None

    @property
    def mean_foreground_dice(self) -> float:
        """Mean over foreground labels of the per-label mean Dice (0.0 when nothing was evaluated)."""
        value = self.foreground_mean.get("dice")
        return float(value) if value is not None else 0.0

    def case_dice(self, case_id: str) -> dict[int, float]:
        """``{label: Dice}`` of one evaluated case."""
        for case in self.per_case:
            if case["case_id"] == case_id and case.get("metrics"):
                return {int(k): float(v["dice"]) for k, v in case["metrics"].items()}
        raise KeyError(case_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SUMMARY_SCHEMA_VERSION,
            "ok": self.ok,
            "prediction_dir": self.prediction_dir,
            "reference_dir": self.reference_dir,
            "file_ending": self.file_ending,
            "labels": list(self.labels),
            "label_names": dict(self.label_names),
            "tolerance_mm": self.tolerance_mm,
            "per_case": self.per_case,
            "mean": self.mean,
            "foreground_mean": self.foreground_mean,
            "problems": list(self.problems),
            "regions": {k: list(v) for k, v in self.regions.items()},
            "ignore_value": self.ignore_value,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EvaluationSummary":
        return cls(
            ok=bool(data["ok"]),
            per_case=list(data["per_case"]),
            mean=dict(data["mean"]),
            foreground_mean=dict(data.get("foreground_mean", {})),
            labels=[int(v) for v in data.get("labels", [])],
            label_names={str(k): str(v) for k, v in data.get("label_names", {}).items()},
            tolerance_mm=float(data.get("tolerance_mm", 1.0)),
            problems=list(data.get("problems", [])),
            prediction_dir=str(data.get("prediction_dir", "")),
            reference_dir=str(data.get("reference_dir", "")),
            file_ending=str(data.get("file_ending", "")),
            regions={str(k): [int(x) for x in v] for k, v in (data.get("regions") or {}).items()},
            ignore_value=None if data.get("ignore_value") is None else int(data["ignore_value"]),
        )


def load_summary(path: str | os.PathLike) -> EvaluationSummary:
    """Read a summary.json written by :func:`evaluate_folders` (a folder holding one is accepted)."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_FILE
    data = read_json(path)
    if not isinstance(data, dict) or data.get("schema_version") != SUMMARY_SCHEMA_VERSION:
        raise AutosegError(
            f"{path}: expected an autoseg evaluation summary with schema_version {SUMMARY_SCHEMA_VERSION}, "
            f"found {data.get('schema_version') if isinstance(data, dict) else type(data).__name__}; "
            "rerun `autoseg evaluate` to regenerate it"
        )
    return EvaluationSummary.from_json(data)


# ------------------------------------------------------------------------------------------- finding cases
def detect_file_ending(folder: str | os.PathLike) -> str:
    """The most common supported image ending among the files of ``folder``."""
    folder = Path(folder)
    counts = Counter(ending_of(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    counts.pop(None, None)
    if not counts:
        raise DatasetError(
            f"{folder}: no segmentation files found; expected <case><ending> files with an ending among "
            f"{', '.join(SUPPORTED_ENDINGS)}; point the command at the folder that holds the predictions"
        )
    return counts.most_common(1)[0][0]  # type: ignore[return-value]


def list_segmentations(folder: str | os.PathLike, ending: str) -> dict[str, Path]:
    """``{case_id: path}`` of the ``<case><ending>`` files in ``folder`` (hidden/partial files skipped)."""
    folder = Path(folder)
    found = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(ending.lower()):
            found[path.name[: -len(ending)]] = path
    return found


def evaluation_keys(scheme: LabelScheme) -> tuple[list[int], dict[int, str], dict[int, list[int]] | None]:
    """What a summary scores for a dataset: ``(keys, names, regions)``. Plain classes: the foreground label
    values, their names, None. Regions: ``1..R`` in dataset.json order, the region names, and
    ``{key: label values}``."""
    if scheme.has_regions:
        regions = {index + 1: list(values) for index, (_, values) in enumerate(scheme.regions)}
        names = {index + 1: name for index, (name, _) in enumerate(scheme.regions)}
        return list(regions), names, regions
    names = {values[0]: name for name, values in scheme.evaluation_units()}
    return sorted(names), names, None


def _dataset_scheme(reference_dir: Path) -> LabelScheme | None:
    """The label scheme of the dataset.json next to a labelsTr folder, if there is one."""
    from autoseg.dataset import load_dataset_spec

    for candidate in (reference_dir, reference_dir.parent):
        if (candidate / "dataset.json").is_file():
            try:
                spec = load_dataset_spec(candidate)
            except AutosegError:
                return None
            return spec.label_scheme
    return None


# ------------------------------------------------------------------------------------------- per case
def _evaluate_case(
    job: tuple[str, str, str, list[int] | None, float, dict[int, list[int]] | None, int | None],
) -> dict[str, Any]:
    """Worker: read one prediction/reference pair and compute its metrics (top level so it pickles for the
    process pool; only paths and numbers cross the process boundary). ``regions``/``ignore_value``: as
    :func:`autoseg.evaluation.metrics.case_metrics` takes them."""
    from autoseg.evaluation.metrics import case_metrics

    case_id, prediction_path, reference_path, labels, tolerance_mm, regions, ignore_value = job
    record: dict[str, Any] = {
        "case_id": case_id,
        "prediction": prediction_path,
        "reference": reference_path,
        "geometry_mismatch": [],
        "error": None,
        "metrics": {},
    }
    try:
        reference, reference_geometry = read_segmentation(reference_path)
        prediction, prediction_geometry = read_segmentation(prediction_path)
    except ImageReadError as exc:
        record["error"] = str(exc)
        return record
    record["geometry_mismatch"] = prediction_geometry.mismatch(reference_geometry)
    if prediction.shape != reference.shape:
        record["error"] = (
            f"{prediction_path}: shape {prediction.shape} differs from reference {reference.shape}; the "
            "prediction must be written in the reference image's grid"
        )
        return record
    if labels is None:
        present = {int(v) for v in np.unique(reference)} | {int(v) for v in np.unique(prediction)}
        labels = sorted(present - {0, ignore_value})
    record["num_voxels"] = int(reference.size)
    record["metrics"] = {
        str(label): values
        for label, values in case_metrics(reference, prediction, labels, reference_geometry.spacing, tolerance_mm,
                                          regions=regions, ignore_value=ignore_value).items()
    }
    return record


def _both_empty(num_voxels: int) -> dict[str, float]:
    """Metrics of a label absent from both masks of a case (the conventions of autoseg.evaluation.metrics)."""
    from autoseg.evaluation.metrics import class_metrics

    values = class_metrics(np.zeros(1, bool), np.zeros(1, bool), (1.0,))
    values["tn"] = float(num_voxels)
    return values


def evaluate_pairs(
    pairs: Sequence[tuple[str, str | os.PathLike, str | os.PathLike]],
    labels: Sequence[int] | None = None,
    tolerance_mm: float = 1.0,
    num_workers: int = 2,
    label_names: dict[int, str] | None = None,
    description: str = "evaluating",
    label_scheme: LabelScheme | None = None,
) -> EvaluationSummary:
    """Evaluate ``(case_id, prediction_file, reference_file)`` triples; nothing is written.

    ``label_scheme``: the dataset's labels; it decides the scored units (:func:`evaluation_keys`: classes,
    or regions by key ``1..R``), their default names and the ignore value. ``labels`` None: every unit of
    the scheme; without a scheme, every non-zero value found in any reference or prediction. Cases run in
    ``num_workers`` processes (spawned, so a caller that already holds CUDA or torch threads is safe).
    """
    if tolerance_mm < 0 or not math.isfinite(tolerance_mm):
        raise AutosegError(f"NSD tolerance must be a finite number of mm >= 0, found {tolerance_mm}")
    regions, ignore_value = None, None
    if label_scheme is not None:
        keys, names, regions = evaluation_keys(label_scheme)
        labels = keys if labels is None else labels
        label_names = names if label_names is None else label_names
        ignore_value = label_scheme.ignore_value
    jobs = [(cid, str(p), str(r), None if labels is None else [int(v) for v in labels], float(tolerance_mm),
             regions, ignore_value)
            for cid, p, r in sorted(pairs, key=lambda t: t[0])]
    records: list[dict[str, Any]] = run_all(_evaluate_case, jobs, num_workers, description)

    if labels is None:
        found = sorted({int(k) for record in records for k in record["metrics"]})
        labels = found
        for record in records:  # a label absent from both masks of a case: both-empty convention
            if record["error"] is None:
                for label in found:
                    record["metrics"].setdefault(str(label), _both_empty(record["num_voxels"]))
    labels = [int(v) for v in labels]
    for record in records:
        record.pop("num_voxels", None)

    from autoseg.evaluation.metrics import aggregate

    evaluated = [record["metrics"] for record in records if record["error"] is None]
    aggregated = aggregate(evaluated, labels)
    problems = []
    for record in records:
        if record["error"]:
            problems.append(f"{record['case_id']}: {record['error']}")
        elif record["geometry_mismatch"]:
            problems.append(
                f"{record['case_id']}: prediction geometry differs from the reference "
                f"({'; '.join(record['geometry_mismatch'])}); metrics use the reference spacing"
            )
    names = {str(k): v for k, v in (label_names or {}).items() if int(k) in labels}
    return EvaluationSummary(
        ok=not problems,
        per_case=records,
        mean={str(label): values for label, values in aggregated["per_label"].items()},
        foreground_mean=aggregated["foreground"],
        labels=labels,
        label_names=names,
        tolerance_mm=float(tolerance_mm),
        problems=problems,
        regions={str(k): list(v) for k, v in (regions or {}).items() if int(k) in labels},
        ignore_value=ignore_value,
    )


def evaluate_folders(
    prediction_dir: str | os.PathLike,
    reference_dir: str | os.PathLike,
    labels: Sequence[int] | None = None,
    tolerance_mm: float = 1.0,
    num_workers: int = 2,
    file_ending: str | None = None,
    case_ids: Sequence[str] | None = None,
    label_scheme: LabelScheme | None = None,
) -> EvaluationSummary:
    """Evaluate every prediction in ``prediction_dir`` against the same-named file in ``reference_dir`` and
    write ``<prediction_dir>/summary.json`` atomically.

    ``labels``: label values (region datasets: region keys) to evaluate; default: every class or region of
    ``label_scheme``, which defaults to the dataset.json beside ``reference_dir`` if there is one; without
    either, every non-zero value found. ``file_ending``: detected from the
    prediction folder when None. ``case_ids``: evaluate exactly these cases (a missing prediction is then a
    problem); default: every prediction found. A prediction without a reference is a problem too.
    """
    prediction_dir, reference_dir = Path(prediction_dir), Path(reference_dir)
    for folder, role in ((prediction_dir, "prediction"), (reference_dir, "reference")):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: {role} folder does not exist; pass the folder of <case><ending> files")
    ending = file_ending or detect_file_ending(prediction_dir)
    predictions = list_segmentations(prediction_dir, ending)
    references = list_segmentations(reference_dir, ending)
    wanted = list(case_ids) if case_ids is not None else sorted(predictions)
    if not wanted:
        raise DatasetError(f"{prediction_dir}: no {ending} predictions to evaluate")
    problems = []
    pairs = []
    for case_id in wanted:
        if case_id not in predictions:
            problems.append(f"{case_id}: no prediction {prediction_dir / (case_id + ending)}")
        elif case_id not in references:
            problems.append(
                f"{case_id}: no reference {reference_dir / (case_id + ending)}; predictions and references must "
                "share file names"
            )
        else:
            pairs.append((case_id, predictions[case_id], references[case_id]))
    scheme = label_scheme if label_scheme is not None else _dataset_scheme(reference_dir)
    summary = evaluate_pairs(pairs, labels, tolerance_mm, num_workers, label_scheme=scheme)
    summary.problems = problems + summary.problems
    summary.ok = summary.ok and not problems and bool(pairs)
    summary.prediction_dir, summary.reference_dir, summary.file_ending = str(prediction_dir), str(reference_dir), ending
    write_json(prediction_dir / SUMMARY_FILE, summary.to_json())
    log.debug("wrote %s", prediction_dir / SUMMARY_FILE)
    return summary


# ------------------------------------------------------------------------------------------- table
def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def format_table(summary: EvaluationSummary) -> str:
    """A readable plain-text table of the per-label means (and the problems), for the terminal."""
    evaluated = sum(1 for case in summary.per_case if case.get("error") is None)
    header = (
        f"{evaluated} case(s) evaluated, NSD tolerance {summary.tolerance_mm:g} mm"
        + (f", predictions in {summary.prediction_dir}" if summary.prediction_dir else "")
    )
    columns = ("Dice", "IoU", "HD95 mm", "NSD", "precision", "recall")
    keys = ("dice", "iou", "hd95", "nsd", "precision", "recall")
    names = [f"{label} {summary.label_names.get(str(label), '')}".strip() for label in summary.labels]
    width = max([len("foreground mean"), *(len(n) for n in names)]) + 2
    lines = [header, "label".ljust(width) + "".join(c.rjust(10) for c in columns) + "n".rjust(6)]
    for label, name in zip(summary.labels, names):
        means = summary.mean.get(str(label), {})
        digits = [2 if key == "hd95" else 3 for key in keys]
        lines.append(
            name.ljust(width)
            + "".join(_fmt(means.get(key), d).rjust(10) for key, d in zip(keys, digits))
            + str(means.get("n", 0)).rjust(6)
        )
    lines.append(
        "foreground mean".ljust(width)
        + "".join(_fmt(summary.foreground_mean.get(key), 2 if key == "hd95" else 3).rjust(10) for key in keys)
    )
    if summary.problems:
        lines.append(f"{len(summary.problems)} problem(s):")
        lines.extend(f"  {problem}" for problem in summary.problems)
    return "\n".join(lines)
