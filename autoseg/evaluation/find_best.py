"""`autoseg find-best`: choose the best trained model (or pairwise ensemble) from cross-validation.

1. Collect the trained models under ``results/<D>/<config>__<arch>/`` whose requested folds all have a
   ``validation/`` folder with every validation case of ``splits.json`` (models with gaps are skipped with
   a message naming what is missing; if the user named the model, or nothing is complete, it is an error).
2. Evaluate each model on the merged validation cases of its folds (one prediction per training case).
3. Ensemble every pair of models: average their ``<case>.npz`` probabilities, argmax, evaluate.
4. Pick the highest mean foreground Dice (ties: the single model, then the earlier name).
5. Decide largest-component postprocessing on the winner's cross-validation predictions and write it:
   single model -> ``results/<D>/<config>__<arch>/postprocessing.json`` (what ``autoseg predict`` reads);
   ensemble -> ``results/<D>/ensembles/<a>--<b>/postprocessing.json`` (not into the members' folders: the
   rules were decided for the ensemble's output and would be wrong for a member predicting alone).
6. Write ``results/<D>/find_best.json``, the report (``results/<D>/find_best/report.html``) and print the
   ``autoseg predict`` command(s).
"""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from autoseg.contracts.postprocessing import PostprocessingRules, save_postprocessing
from autoseg.dataset import load_dataset_spec
from autoseg.errors import ConfigurationError, DatasetError, ImageReadError
from autoseg.dataset.labels import LabelScheme
from autoseg.evaluation.evaluate import EvaluationSummary, evaluate_pairs, evaluation_keys
from autoseg.evaluation.parallel import run_all
from autoseg.evaluation.postprocessing import decide_postprocessing
from autoseg.fileio import read_json, write_json
from autoseg.io import read_segmentation, write_segmentation
from autoseg.paths import resolve_dataset

log = logging.getLogger(__name__)

FIND_BEST_FILE = "find_best.json"
FIND_BEST_SCHEMA_VERSION = 1
WORK_FOLDER = "find_best"  # results/<D>/find_best/: summaries, ensemble predictions, the report
ENSEMBLES_FOLDER = "ensembles"  # results/<D>/ensembles/<a>--<b>/postprocessing.json
DEFAULT_FOLDS = (0, 1, 2, 3, 4)


@dataclass
class Candidate:
    """A model or an ensemble of two, with its cross-validation predictions ``{case_id: segmentation}``."""

    name: str
    members: tuple[str, ...]
    predictions: dict[str, Path]
    probabilities: dict[str, Path] = field(default_factory=dict)
    summary: EvaluationSummary | None = None

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    @property
    def score(self) -> float:
        return self.summary.mean_foreground_dice if self.summary is not None else float("-inf")


@dataclass
class FindBestResult:
    """What find-best decided; ``format()`` is the text printed for the user."""

    dataset: str
    best: str
    members: list[str]
    ranking: list[tuple[str, float]]
    rules: PostprocessingRules
    postprocessing_file: Path
    commands: list[str]
    find_best_file: Path
    report: Path | None
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def format(self) -> str:
        lines = [f"find-best for {self.dataset} (cross-validation, mean foreground Dice):"]
        width = max(len(name) for name, _ in self.ranking)
        for name, score in self.ranking:
            marker = "  <- best" if name == self.best else ""
            lines.append(f"  {name.ljust(width)}  {score:.4f}{marker}")
        for name, missing in self.skipped.items():
            lines.append(f"  skipped {name}: missing {', '.join(missing)}")
        lines.append(f"postprocessing: {self.rules.describe()} ({self.postprocessing_file})")
        lines.append("predict new images with:")
        lines.extend(f"  {command}" for command in self.commands)
        if self.report is not None:
            lines.append(f"report: {self.report}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- collecting
def split_model_name(folder_name: str) -> tuple[str, str]:
    """``"3d_fullres__unet"`` -> ``("3d_fullres", "unet")`` (configuration before ``__``, architecture after)."""
    if "__" not in folder_name:
        raise ConfigurationError(
            f"results folder '{folder_name}': expected a name <configuration>__<architecture>, found no '__'"
        )
    configuration, architecture = folder_name.split("__", 1)
    return configuration, architecture


def _expected_validation_cases(preprocessed: Path, folds: Sequence[int]) -> dict[int, list[str]] | None:
    path = preprocessed / "splits.json"
    if not path.is_file():
        return None
    splits = read_json(path)
    if not isinstance(splits, list):
        raise ConfigurationError(f"{path}: expected a list of {{'train': [...], 'val': [...]}}, found {type(splits).__name__}")
    expected = {}
    for fold in folds:
        if not 0 <= fold < len(splits) or not isinstance(splits[fold], dict) or "val" not in splits[fold]:
            raise ConfigurationError(f"{path}: has no fold {fold} with a 'val' list; choose folds 0-{len(splits) - 1}")
        expected[fold] = [str(c) for c in splits[fold]["val"]]
    return expected


def collect_model(
    folder: Path, folds: Sequence[int], ending: str, expected: dict[int, list[str]] | None
) -> tuple[Candidate | None, list[str]]:
    """The candidate of one results folder, or None and what is missing (``fold_k/validation``, cases)."""
    missing: list[str] = []
    predictions: dict[str, Path] = {}
    probabilities: dict[str, Path] = {}
    for fold in folds:
        validation = folder / f"fold_{fold}" / "validation"
        if not validation.is_dir():
            missing.append(f"fold_{fold}/validation")
            continue
        found = {
            p.name[: -len(ending)]: p
            for p in sorted(validation.iterdir())
            if p.name.endswith(ending) and not p.name.startswith(".")
        }
        wanted = expected[fold] if expected is not None else sorted(found)
        lacking = [case_id for case_id in wanted if case_id not in found]
        if lacking:
            shown = ", ".join(lacking[:5]) + (" ..." if len(lacking) > 5 else "")
            missing.append(f"fold_{fold}/validation/{{{shown}}}{ending}")
        for case_id in wanted:
            if case_id in found:
                if case_id in predictions:
                    log.warning("%s: case %s is in the validation of several folds; using fold %d", folder, case_id, fold)
                predictions[case_id] = found[case_id]
                npz = validation / f"{case_id}.npz"
                if npz.is_file():
                    probabilities[case_id] = npz
    if missing:
        return None, missing
    if not predictions:
        return None, [f"validation cases in fold(s) {', '.join(map(str, folds))}"]
    return Candidate(folder.name, (folder.name,), predictions, probabilities), []


# ------------------------------------------------------------------------------------------- ensembles
def _ensemble_case(job: tuple[str, str, str, str, dict[str, Any] | None]) -> str:
    """Worker: average two probability files ``[K, *shape]``, argmax (region datasets: sigmoid outputs
    ``[R, *shape]``, painted with ``LabelScheme.paint``), write with the geometry of the first model's
    segmentation."""
    first_npz, second_npz, first_segmentation, target, scheme_json = job
    arrays = []
    for path in (first_npz, second_npz):
        with np.load(path, allow_pickle=False) as npz:
            if "probabilities" not in npz.files:
                raise ImageReadError(f"{path}: expected key 'probabilities', found {npz.files}")
            arrays.append(npz["probabilities"].astype(np.float32))
    if arrays[0].shape != arrays[1].shape:
        raise ImageReadError(
            f"{second_npz}: probabilities of shape {arrays[1].shape}, {first_npz} has {arrays[0].shape}; "
            "both models must predict the same label set in the original image grid"
        )
    _, geometry = read_segmentation(first_segmentation)
    scheme = None if scheme_json is None else LabelScheme.from_json(scheme_json)
    if scheme is not None and scheme.has_regions:
        segmentation = scheme.paint((arrays[0] + arrays[1]) / 2)  # mean probability of each region > 0.5
    else:
        segmentation = np.argmax(arrays[0] + arrays[1], axis=0).astype(np.uint8)  # mean and sum share the argmax
    write_segmentation(segmentation, geometry, target)
    return target


def build_ensemble(
    first: Candidate, second: Candidate, output: Path, ending: str, num_workers: int = 2,
    label_scheme: LabelScheme | None = None,
) -> Candidate | None:
    """The pairwise ensemble's predictions written into ``output``; None (with a warning) when either
    model lacks probabilities for a case the two share. ``label_scheme`` with regions: probabilities are
    per-region sigmoids, painted instead of arg-maxed."""
    cases = sorted(set(first.predictions) & set(second.predictions))
    lacking = [c for c in cases if c not in first.probabilities or c not in second.probabilities]
    if lacking or not cases:
        log.warning(
            "not ensembling %s and %s: %s", first.name, second.name,
            f"no <case>.npz probabilities for {', '.join(lacking[:5])}" if lacking else "no shared cases",
        )
        return None
    jobs = [
        (str(first.probabilities[c]), str(second.probabilities[c]), str(first.predictions[c]), str(output / f"{c}{ending}"),
         None if label_scheme is None else label_scheme.to_json())
        for c in cases
    ]
    output.mkdir(parents=True, exist_ok=True)
    run_all(_ensemble_case, jobs, num_workers, f"ensemble {first.name} + {second.name}")
    return Candidate(
        f"{first.name} + {second.name}",
        (first.name, second.name),
        {c: output / f"{c}{ending}" for c in cases},
    )


# ------------------------------------------------------------------------------------------- commands
def predict_commands(
    dataset: str,
    members: Sequence[str],
    folds: Sequence[int],
    root: str | os.PathLike | None,
    ensemble_postprocessing: str | os.PathLike | None = None,
) -> list[str]:
    """The `autoseg predict` (and, for two members, `autoseg ensemble`) command lines to use.

    ``ensemble_postprocessing``: the ensemble's postprocessing.json, passed to `autoseg ensemble` (a single
    model's rules sit in its results folder, where `autoseg predict` finds them by itself)."""
    fold_text = " ".join(str(f) for f in folds)
    root_text = f" --root {root}" if root is not None else ""
    if len(members) == 1:
        configuration, architecture = split_model_name(members[0])
        return [
            f"autoseg predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d {dataset} -c {configuration} --arch {architecture} "
            f"-f {fold_text}{root_text}"
        ]
    commands = []
    for member in members:
        configuration, architecture = split_model_name(member)
        commands.append(
            f"autoseg predict -i INPUT_FOLDER -o OUTPUT_FOLDER/{member} -d {dataset} -c {configuration} "
            f"--arch {architecture} -f {fold_text} --save-probabilities{root_text}"
        )
    rules_text = f" --postprocessing {ensemble_postprocessing}" if ensemble_postprocessing is not None else ""
    commands.append(
        "autoseg ensemble -i " + " ".join(f"OUTPUT_FOLDER/{m}" for m in members) + " -o OUTPUT_FOLDER/ensemble"
        + rules_text
    )
    return commands


# ------------------------------------------------------------------------------------------- main
def find_best(
    dataset: str | int,
    root: str | os.PathLike | None = None,
    configurations: Sequence[str] | None = None,
    folds: Sequence[int] = DEFAULT_FOLDS,
    num_workers: int = 2,
    tolerance_mm: float = 1.0,
    report: bool = True,
    print_summary: bool = True,
) -> FindBestResult:
    """Choose the best model or pairwise ensemble by cross-validated mean foreground Dice (see module doc).

    ``configurations``: result folder names (``3d_fullres__unet``) or configuration names (``3d_fullres``,
    every architecture) to consider; default: every folder under ``results/<D>/``. ``folds=(0,)`` is the
    demo's quick mode. ``print_summary``: print the ranking and the predict commands (the user-facing
    summary of the command).
    """
    folds = [int(f) for f in folds]
    if not folds:
        raise ConfigurationError("find-best needs at least one fold, e.g. --folds 0 1 2 3 4")
    location = resolve_dataset(dataset, root)
    if not (location.raw / "dataset.json").is_file():
        raise DatasetError(
            f"{location.raw}: raw dataset (dataset.json, labelsTr/) not found; find-best compares predictions "
            "with the training labels, so the raw dataset must be present under raw/"
        )
    spec = load_dataset_spec(location.raw)
    ending = spec.file_ending
    scheme = spec.label_scheme
    _, labels, _ = evaluation_keys(scheme)  # {key: name}: foreground classes, or regions 1..R
    references = location.raw / "labelsTr"
    if not location.results.is_dir():
        raise ConfigurationError(
            f"{location.results}: no results folder; train every fold first: autoseg train {location.name} CONFIG FOLD"
        )

    folders = sorted(p for p in location.results.iterdir() if p.is_dir() and "__" in p.name)
    if configurations:
        wanted = [str(c) for c in configurations]
        chosen = [p for p in folders if p.name in wanted or split_model_name(p.name)[0] in wanted]
        unknown = [c for c in wanted if not any(p.name == c or split_model_name(p.name)[0] == c for p in folders)]
        if unknown:
            raise ConfigurationError(
                f"{location.results}: no results for {', '.join(unknown)}; found "
                f"{', '.join(p.name for p in folders) or 'none'}; train it first or pick from those"
            )
        folders = chosen
    if not folders:
        raise ConfigurationError(
            f"{location.results}: no trained models (<config>__<arch> folders); train all folds first: "
            f"autoseg train {location.name} CONFIG FOLD"
        )

    expected = _expected_validation_cases(location.preprocessed, folds)
    candidates: list[Candidate] = []
    skipped: dict[str, list[str]] = {}
    for folder in folders:
        candidate, missing = collect_model(folder, folds, ending, expected)
        if candidate is None:
            skipped[folder.name] = missing
        else:
            candidates.append(candidate)
    if skipped and (configurations or not candidates):
        detail = "; ".join(f"{name}: {', '.join(missing)}" for name, missing in skipped.items())
        raise ConfigurationError(
            f"{location.results}: validation predictions missing ({detail}); finish training those folds "
            f"(autoseg train {location.name} CONFIG FOLD) or choose folds with --folds"
        )
    for name, missing in skipped.items():
        log.warning("skipping %s: missing %s", name, ", ".join(missing))

    work = location.results / WORK_FOLDER
    for first, second in itertools.combinations(list(candidates), 2):
        ensemble = build_ensemble(first, second, work / ENSEMBLES_FOLDER / f"{first.name}--{second.name}", ending,
                                  num_workers, scheme)
        if ensemble is not None:
            candidates.append(ensemble)

    for candidate in candidates:
        lacking = [c for c in candidate.predictions if not (references / f"{c}{ending}").is_file()]
        if lacking:
            raise DatasetError(
                f"{references}: no reference for validation case(s) {', '.join(lacking[:5])}; the results do not "
                "belong to this raw dataset"
            )
        pairs = [(c, p, references / f"{c}{ending}") for c, p in sorted(candidate.predictions.items())]
        candidate.summary = evaluate_pairs(
            pairs, sorted(labels), tolerance_mm, num_workers, label_names=labels, description=f"evaluating {candidate.name}",
            label_scheme=scheme,
        )
        write_json(work / "summaries" / f"{candidate.name.replace(' + ', '--')}.json", candidate.summary.to_json())
        log.info("%s: mean foreground Dice %.4f", candidate.name, candidate.score)

    # Stable sort: singles come before ensembles in `candidates`, so ties go to the simpler model.
    ranked = sorted(candidates, key=lambda c: -c.score)
    best = ranked[0]
    rules = decide_postprocessing(
        [(best.predictions[c], references / f"{c}{ending}") for c in sorted(best.predictions)],
        sorted(labels),
        num_workers,
        label_scheme=scheme,
    )
    if best.is_ensemble:
        rules_folder = location.results / ENSEMBLES_FOLDER / "--".join(best.members)
    else:
        rules_folder = location.results / best.members[0]
    postprocessing_file = save_postprocessing(rules_folder, rules)
    ensemble_rules = postprocessing_file if best.is_ensemble and rules.changes_anything else None
    commands = predict_commands(location.name, best.members, folds, root, ensemble_rules)
    notes = []
    if len(folds) < len(DEFAULT_FOLDS):
        notes.append(f"decided on fold(s) {', '.join(map(str, folds))} only: a quick estimate, not a full cross-validation")

    report_path = None
    if report:
        report_path = _write_report(location.name, work, labels, ranked, best, rules, commands, notes, folds, candidates,
                                    location, ending, skipped)

    ranking = [(c.name, c.score) for c in ranked]
    find_best_file = location.results / FIND_BEST_FILE
    write_json(
        find_best_file,
        {
            "schema_version": FIND_BEST_SCHEMA_VERSION,
            "dataset": location.name,
            "folds": folds,
            "labels": {str(k): v for k, v in labels.items()},
            "ranking": [
                {
                    "name": c.name,
                    "members": list(c.members),
                    "mean_foreground_dice": c.score,
                    "mean_dice": {k: v.get("dice") for k, v in c.summary.mean.items()} if c.summary else {},
                    "num_cases": len(c.predictions),
                }
                for c in ranked
            ],
            "best": {
                "name": best.name,
                "members": [
                    {"results_folder": m, "configuration": split_model_name(m)[0], "architecture": split_model_name(m)[1]}
                    for m in best.members
                ],
                "mean_foreground_dice": best.score,
                "postprocessing": rules.to_json(),
                "postprocessing_file": str(postprocessing_file),
            },
            "commands": commands,
            "notes": notes,
            "skipped": skipped,
            "report": str(report_path) if report_path else None,
        },
    )
    result = FindBestResult(location.name, best.name, list(best.members), ranking, rules, postprocessing_file,
                            commands, find_best_file, report_path, skipped)
    if print_summary:
        print(result.format())  # deliberate user-facing summary: the commands to run next
    return result


def _write_report(
    dataset: str,
    work: Path,
    labels: dict[int, str],
    ranked: list[Candidate],
    best: Candidate,
    rules: PostprocessingRules,
    commands: list[str],
    notes: list[str],
    folds: list[int],
    candidates: list[Candidate],
    location: Any,
    ending: str,
    skipped: dict[str, list[str]],
) -> Path:
    from autoseg.evaluation.report import OverlayCase, ReportContent, pick_overlay_cases, read_training_log, write_report

    per_case_dice: dict[str, dict[int, list[float]]] = {}
    for candidate in ranked:
        assert candidate.summary is not None
        per_case_dice[candidate.name] = {
            label: [float(case["metrics"][str(label)]["dice"]) for case in candidate.summary.per_case if case["metrics"]]
            for label in labels
        }
    training_logs: dict[str, dict[int, dict[str, Any]]] = {}
    for candidate in candidates:
        if not candidate.is_ensemble:
            logs = {}
            for fold in folds:
                curves = read_training_log(location.results / candidate.name / f"fold_{fold}" / "training_log.json")
                if curves is not None:
                    logs[fold] = curves
            training_logs[candidate.name] = logs
    assert best.summary is not None
    scores = [
        (case["case_id"], float(np.mean([v["dice"] for v in case["metrics"].values()])))
        for case in best.summary.per_case if case["metrics"]
    ]
    overlays = []
    for title, case_id, score in pick_overlay_cases(scores):
        image = location.raw / "imagesTr" / f"{case_id}_0000{ending}"
        overlays.append(OverlayCase(title, case_id, score, image if image.is_file() else None,
                                    location.raw / "labelsTr" / f"{case_id}{ending}", best.predictions[case_id]))
    decision = [
        f"best: {best.name} (mean foreground Dice {best.score:.4f} over {len(best.predictions)} cases, "
        f"fold(s) {', '.join(map(str, folds))})",
        f"postprocessing: {rules.describe()}",
    ]
    if rules.dice_before:
        decision.append(
            "Dice per label before -> after postprocessing: "
            + ", ".join(f"{k}: {rules.dice_before[k]:.4f} -> {rules.dice_after[k]:.4f}" for k in rules.dice_before)
        )
    notes = list(notes) + [f"skipped {name}: missing {', '.join(missing)}" for name, missing in skipped.items()]
    content = ReportContent(
        dataset=dataset,
        labels=labels,
        ranking=[(c.name, c.score) for c in ranked],
        per_case_dice=per_case_dice,
        training_logs=training_logs,
        overlays=overlays,
        best=best.name,
        decision=decision,
        commands=commands,
        notes=notes,
    )
    return write_report(work, content)
