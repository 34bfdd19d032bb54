"""Accuracy at equal wall-clock budget: autoseg's default pipeline against nnU-Net v2's, same split, same scorer.

Usage::

    python benchmarks/accuracy.py DATASET --budget 20m [--root R] [--fold 0] [--skip-nnunet] [--skip-ours]
                                  [--out docs-table.md] [--configuration C] [--device cpu] [--overwrite]

DATASET is a dataset under ``--root`` (folder name, number or name, as for every autoseg command), a path to a
raw ``DatasetXXX_Name`` folder, an MSD task folder (``Task04_Hippocampus``: ``autoseg convert-msd`` first), or an
oracle dataset of ``../shared/reference/oracle`` (``Dataset970_SynthMR``, ``970``, ``SynthMR``): regenerated from
its ``recipe.txt`` with ``--n-test 4`` extra test cases (``--n-cases`` shrinks it for plumbing checks).

Both sides run as subprocesses measured the same way (:func:`common.run_measured`: wall time, peak memory of the
process tree):

- autoseg: ``autoseg plan D --no-preprocess`` (fingerprint, plans, splits.json) -> ``autoseg preprocess D -c C``
  -> ``autoseg train D C FOLD --time-budget B`` (its own validation/ predictions) [-> ``autoseg predict`` on
  imagesTs]. C = ``3d_fullres`` when planned, else ``2d`` (2D data), unless ``--configuration``.
- nnU-Net v2 (``--nnunet-venv``): the raw folder symlinked into its nnUNet_raw -> ``nnUNetv2_plan_and_preprocess
  --no_pp`` -> ``nnUNetv2_preprocess -c C`` -> OUR splits.json written as its splits_final.json -> budget-driven
  ``nnUNetTrainer`` (nnunet_budget_driver.py; how: its docstring and benchmarks/README.md) with its own final
  validation [-> ``nnUNetv2_predict`` on imagesTs].

Both are scored by OUR evaluator (``autoseg.evaluation.evaluate_folders``) on exactly the fold's validation case
ids (and the test cases when ``imagesTs``/``labelsTs`` exist): per-class Dice and HD95 side by side, foreground
mean, stage wall times. The table is printed, written as markdown (``--out``, for docs/benchmarks.md) and as JSON
beside it (same name, ``.json``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from common import (BenchmarkError, Measurement, format_number, format_seconds, machine_description, markdown_table,
                    parse_budget, run_measured)
from nnunet_side import NnUNet, load_splits_file, nnunet_fold_dir

log = logging.getLogger("accuracy")

REPO = Path(__file__).resolve().parents[1]
ORACLE = REPO.parent / "shared" / "reference" / "oracle"
DEFAULT_NNUNET_VENV = REPO / ".venv-nnunet"
DEFAULT_OUT_DIR = REPO / "bench_out" / "accuracy"  # git-ignored
N_TEST_ORACLE = 4  # issue 9: Dataset970_SynthMR "with 4 extra test cases"
STAGES = ("convert", "plan", "preprocess", "train", "predict test")


# ------------------------------------------------------------------------------------------ results
@dataclass
class SideResult:
    """What one tool did: measured stages, where its predictions are, and their scores."""

    name: str
    stages: dict[str, Measurement] = field(default_factory=dict)
    validation_dir: Path | None = None
    test_dir: Path | None = None
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # set name -> {"mean", "foreground_mean", ...}
    training: dict[str, Any] = field(default_factory=dict)  # epochs/iterations/elapsed as the tool reports them

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "stages": {k: v.to_json() for k, v in self.stages.items()},
                "validation_dir": str(self.validation_dir) if self.validation_dir else None,
                "test_dir": str(self.test_dir) if self.test_dir else None, "scores": self.scores,
                "training": self.training}


# ------------------------------------------------------------------------------------ pure helpers
def oracle_folder(identifier: str, oracle_root: Path = ORACLE) -> Path | None:
    """The oracle folder ``identifier`` names (``Dataset970_SynthMR``, ``970``, ``SynthMR``), or None."""
    if not oracle_root.is_dir():
        return None
    ident = identifier.strip()
    for folder in sorted(oracle_root.iterdir()):
        if not (folder / "recipe.txt").is_file() or not folder.name.startswith("Dataset"):
            continue
        number, _, name = folder.name[len("Dataset"):].partition("_")
        if ident == folder.name or (ident.isdigit() and int(ident) == int(number)) or ident.lower() == name.lower():
            return folder
    return None


def recipe_command(recipe: str, raw_root: Path, repo: Path = REPO, n_cases: int | None = None,
                   n_test: int = N_TEST_ORACLE) -> tuple[list[str], Path]:
    """Turn an oracle recipe (``python ../shared/bench/make_synthetic.py OUT/Dataset970_SynthMR -n 20 --seed 0``)
    into (argument list after the interpreter, output folder): the script path resolved against the repository
    root (the recipe is written from there), ``OUT`` replaced by ``raw_root``, ``-n`` replaced when ``n_cases``
    is given, ``--n-test`` set."""
    lines = [line for line in recipe.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) != 1:
        raise BenchmarkError(f"oracle recipe: expected one command line, found {len(lines)}")
    tokens = shlex.split(lines[0])
    if len(tokens) < 3 or not tokens[0].startswith("python") or not tokens[2].startswith("OUT/"):
        raise BenchmarkError(f"oracle recipe {lines[0]!r}: expected 'python SCRIPT OUT/DatasetXXX_Name ...'")
    script = (repo / tokens[1]).resolve()
    out = raw_root / tokens[2][len("OUT/"):]
    args = tokens[3:]
    for flag in ("--n-test",) + (("-n",) if n_cases is not None else ()):
        if flag in args:  # drop the recipe's value: ours replaces it
            index = args.index(flag)
            del args[index:index + 2]
    if n_cases is not None:
        args = ["-n", str(n_cases), *args]
    return [str(script), str(out), *args, "--n-test", str(n_test)], out


def pick_configuration(configuration_names: Sequence[str], requested: str | None = None) -> str:
    """The configuration both tools train: ``requested`` if given, else 3d_fullres, else 2d (2D data)."""
    if requested:
        if requested not in configuration_names:
            raise BenchmarkError(f"--configuration {requested}: not in the plans ({', '.join(configuration_names)})")
        return requested
    for name in ("3d_fullres", "2d"):
        if name in configuration_names:
            return name
    raise BenchmarkError(f"plans have neither 3d_fullres nor 2d ({', '.join(configuration_names)}); pass --configuration")


def score_rows(labels: Sequence[int], names: Mapping[str, str], ours: Mapping[str, Any] | None,
               theirs: Mapping[str, Any] | None) -> list[list[str]]:
    """Rows ``class | Dice autoseg | Dice nnU-Net | delta | HD95 autoseg | HD95 nnU-Net`` from two score dicts
    ``{"mean": {label: {"dice", "hd95"}}, "foreground_mean": {...}}`` (None = that side did not run)."""

    def value(side: Mapping[str, Any] | None, label: str | None, metric: str) -> float | None:
        if side is None:
            return None
        block = side.get("foreground_mean", {}) if label is None else side.get("mean", {}).get(label, {})
        result = block.get(metric)
        return None if result is None else float(result)

    rows = []
    for label in [*(str(label) for label in labels), None]:
        title = "foreground mean" if label is None else f"{label} {names.get(label, '')}".strip()
        dice_ours, dice_theirs = value(ours, label, "dice"), value(theirs, label, "dice")
        delta = None if dice_ours is None or dice_theirs is None else dice_ours - dice_theirs
        rows.append([title, format_number(dice_ours), format_number(dice_theirs),
                     "-" if delta is None else f"{delta:+.3f}", format_number(value(ours, label, "hd95"), 2),
                     format_number(value(theirs, label, "hd95"), 2)])
    return rows


def stage_rows(ours: Mapping[str, Measurement], theirs: Mapping[str, Measurement]) -> list[list[str]]:
    """Rows ``stage | autoseg wall | nnU-Net wall | ratio (autoseg / nnU-Net) | peak PSS autoseg | nnU-Net``."""
    rows = []
    for stage in STAGES:
        a, b = ours.get(stage), theirs.get(stage)
        if a is None and b is None:
            continue
        ratio = f"{a.wall_s / b.wall_s:.2f}" if a is not None and b is not None and b.wall_s > 0 else "-"
        rows.append([stage, format_seconds(a.wall_s if a else None), format_seconds(b.wall_s if b else None), ratio,
                     f"{a.peak_pss_mb:.0f} MB" if a else "-", f"{b.peak_pss_mb:.0f} MB" if b else "-"])
    return rows


def render_markdown(result: Mapping[str, Any]) -> str:
    """The markdown section for docs/benchmarks.md from the JSON result of :func:`run`."""
    machine = result["machine"]
    ours, theirs = result["sides"].get("autoseg"), result["sides"].get("nnU-Net")
    lines = [
        f"### {result['dataset']}: {result['configuration']}, fold {result['fold']}, "
        f"{result['budget']} training budget per side ({result['device']})",
        "",
        f"{result['date']}; {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
        f"autoseg {result['versions'].get('autoseg', '?')}, nnU-Net v2 {result['versions'].get('nnunetv2', '?')}. "
        f"Split: autoseg's splits.json fold {result['fold']} for both ({result['num_train']} training / "
        f"{result['num_val']} validation cases). Both scored by autoseg's evaluator (HD95 in mm).",
    ]
    for set_name, set_info in result["sets"].items():
        lines += ["", f"**{set_name}** ({set_info['num_cases']} cases)", ""]
        lines.append(markdown_table(
            ["class", "Dice autoseg", "Dice nnU-Net", "Δ Dice", "HD95 autoseg", "HD95 nnU-Net"],
            score_rows(result["labels"], result["label_names"], ours and ours["scores"].get(set_name),
                       theirs and theirs["scores"].get(set_name))))
    stages_ours = {k: Measurement(**v) for k, v in (ours or {}).get("stages", {}).items()}
    stages_theirs = {k: Measurement(**v) for k, v in (theirs or {}).get("stages", {}).items()}
    lines += ["", "**Stage wall times** (whole commands, imports included; peak = summed PSS of the process tree)", ""]
    lines.append(markdown_table(["stage", "autoseg", "nnU-Net", "ratio", "peak autoseg", "peak nnU-Net"],
                                stage_rows(stages_ours, stages_theirs)))
    notes = []
    for side in (ours, theirs):
        if side and side.get("training"):
            notes.append(f"{side['name']} training: {describe_training(side['training'], result['budget_s'])}")
        if side and side.get("from_run"):
            notes.append(f"{side['name']}: results of the run of {side['from_run']} (same split, budget and cases; "
                         f"`--other-side-from`)")
    problems = result.get("problems", [])
    lines += [""] + [f"- {note}" for note in notes + [f"problem: {p}" for p in problems]]
    return "\n".join(lines).rstrip() + "\n"


def describe_training(training: Mapping[str, Any], budget_s: float | None = None) -> str:
    """One line: epochs (x iterations), when training and its final validation ended, against the budget."""
    parts = []
    if training.get("epochs") is not None:
        iterations = training.get("iterations")
        parts.append(f"{training['epochs']} epochs" + (f", {iterations} iterations" if iterations is not None else ""))
    if training.get("training_ended_s") is not None:
        parts.append(f"training ended at {training['training_ended_s']:.0f} s")
    if training.get("elapsed_s") is not None:
        elapsed = float(training["elapsed_s"])
        over = f", {elapsed - budget_s:.0f} s OVER the budget" if budget_s and elapsed > budget_s * 1.02 else ""
        parts.append(f"done (with final validation) at {elapsed:.0f} s of {budget_s or 0:.0f} s{over}")
    if training.get("method"):
        parts.append(training["method"])
    return ", ".join(parts) or "-"


# ----------------------------------------------------------------------------------- orchestration
def autoseg_command() -> list[str]:
    """Our CLI from the venv running this script (the console script when installed, else ``-m autoseg``)."""
    script = Path(sys.executable).with_name("autoseg")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "autoseg"]


def count_files(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def prepare_dataset(identifier: str, root: Path, logs: Path, n_cases: int | None) -> tuple[str, Measurement | None]:
    """Make the raw dataset available under ``root/raw``; returns (dataset identifier for autoseg, the
    conversion measurement when one ran)."""
    from autoseg.paths import dataset_folder_name, raw_root

    raw = raw_root(root)
    raw.mkdir(parents=True, exist_ok=True)
    oracle = oracle_folder(identifier)
    if oracle is not None:
        args, out = recipe_command((oracle / "recipe.txt").read_text(), raw, n_cases=n_cases)
        wanted = n_cases if n_cases is not None else int(args[args.index("-n") + 1]) if "-n" in args else 20
        have = (count_files(out / "labelsTr", "*"), count_files(out / "labelsTs", "*"))
        if have != (wanted, N_TEST_ORACLE):
            if out.exists():
                log.info("%s has %d training / %d test cases, want %d / %d: regenerating it and dropping its "
                         "preprocessed data and results under %s", out, *have, wanted, N_TEST_ORACLE, root)
                for stale in (out, root / "preprocessed" / out.name, root / "results" / out.name):
                    shutil.rmtree(stale, ignore_errors=True)
            run_measured([sys.executable, *args], log_path=logs / "generate.log")
        return out.name, None
    path = Path(identifier).expanduser()
    if path.is_dir() and path.name.startswith("Task"):  # an MSD task folder
        number, _, name = path.name[len("Task"):].partition("_")
        target = raw / dataset_folder_name(int(number), name)
        if target.is_dir():
            log.info("%s already converted (%s)", path, target)
            return target.name, None
        measurement = run_measured([*autoseg_command(), "convert-msd", path.resolve(), "--root", root],
                                   log_path=logs / "convert.log")
        return target.name, measurement
    if path.is_dir() and (path / "dataset.json").is_file():  # a raw folder elsewhere: link it under our root
        link = raw / path.name
        if not link.exists():
            link.symlink_to(path.resolve(), target_is_directory=True)
        return path.name, None
    return identifier, None


def link_predictions(source: Path, target: Path, case_ids: Sequence[str], ending: str) -> Path:
    """A folder of symlinks to ``<case><ending>`` in ``source`` for ``case_ids`` only: our evaluator writes
    summary.json into the folder it scores, and neither tool's own summary.json may be overwritten."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for case in case_ids:
        file = source / f"{case}{ending}"
        if file.is_file():  # a missing prediction is reported by the evaluator (case_ids are passed to it)
            (target / file.name).symlink_to(file.resolve())
    return target


def score(prediction_dir: Path, reference_dir: Path, case_ids: Sequence[str], workdir: Path, ending: str,
          num_workers: int) -> dict[str, Any]:
    """Score ``case_ids`` of ``prediction_dir`` with autoseg's evaluator; returns the summary as JSON."""
    from autoseg.evaluation import evaluate_folders

    folder = link_predictions(prediction_dir, workdir, case_ids, ending)
    summary = evaluate_folders(folder, reference_dir, case_ids=list(case_ids), num_workers=num_workers,
                               file_ending=ending)
    data = summary.to_json()
    data.pop("per_case", None)  # per-case details stay in <workdir>/summary.json; the table needs the means
    return data


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON result (also written to disk by :func:`main`)."""
    from autoseg import __version__
    from autoseg.dataset import load_dataset_spec
    from autoseg.paths import data_root, fold_folder, resolve_dataset
    from autoseg.contracts.plans import load_plans

    budget_s = parse_budget(args.budget)
    root = data_root(args.root)
    out_dir = Path(args.out).resolve().parent if args.out else DEFAULT_OUT_DIR
    work = Path(args.workdir).resolve() if args.workdir else out_dir / "work"
    logs = work / "logs"
    cli = autoseg_command()
    common_args = ["--root", str(root)]

    ours = SideResult("autoseg")
    theirs = SideResult("nnU-Net")
    dataset, convert = prepare_dataset(args.dataset, root, logs, args.n_cases)
    if convert is not None:
        ours.stages["convert"] = convert
    location = resolve_dataset(dataset, root)
    log.info("dataset %s (raw %s)", location.name, location.raw)
    spec = load_dataset_spec(location.raw)
    ending = spec.file_ending

    # planning always runs: it writes the splits both tools use and names the configuration
    splits_file = location.preprocessed / "splits.json"
    if not args.skip_ours or not splits_file.is_file() or not (location.preprocessed / "plans.json").is_file():
        ours.stages["plan"] = run_measured([*cli, "plan", location.name, "--no-preprocess", "-np", str(args.num_processes),
                                            *common_args], log_path=logs / "autoseg_plan.log")
    plans = load_plans(location.preprocessed / "plans.json")
    configuration = pick_configuration(list(plans.configurations), args.configuration)
    architecture = plans.configuration(configuration).architecture.name
    splits = load_splits_file(splits_file)
    fold = int(args.fold)
    if not 0 <= fold < len(splits):
        raise BenchmarkError(f"--fold {fold}: {splits_file} has folds 0-{len(splits) - 1}")
    train_ids, val_ids = splits[fold]["train"], splits[fold]["val"]
    test_images, test_labels = location.raw / "imagesTs", location.raw / "labelsTs"
    has_test = not args.no_test and test_images.is_dir() and test_labels.is_dir() and any(test_labels.iterdir())
    test_ids = sorted(p.name[:-len(ending)] for p in test_labels.glob(f"*{ending}")) if has_test else []
    log.info("configuration %s, fold %d: %d training / %d validation cases%s", configuration, fold, len(train_ids),
             len(val_ids), f", {len(test_ids)} test cases" if test_ids else "")

    if not args.overwrite:
        # both sides are checked before the first budget is spent: finding nnU-Net's old fold only after our
        # side had trained would throw away that side's run
        blocking = already_trained(
            None if args.skip_ours else fold_folder(location, configuration, architecture, fold),
            None if args.skip_nnunet else nnunet_fold_dir(work / "nnunet", location.name, configuration, fold))
        if blocking:
            raise BenchmarkError(f"{', '.join(map(str, blocking))}: a trained fold is already there; pass "
                                 "--overwrite to train again, or use another --root/--workdir")
    if not args.skip_ours:
        ours.stages["preprocess"] = run_measured(
            [*cli, "preprocess", location.name, "-c", configuration, "-np", str(args.num_processes), *common_args],
            log_path=logs / "autoseg_preprocess.log")
        fold_dir = fold_folder(location, configuration, architecture, fold)
        if fold_dir.exists():
            if not args.overwrite:
                raise BenchmarkError(f"{fold_dir}: a trained fold is already there; pass --overwrite to train again "
                                     "or use another --root")
            shutil.rmtree(fold_dir)
        ours.stages["train"] = run_measured(
            [*cli, "train", location.name, configuration, str(fold), "--time-budget", args.budget,
             "--device", args.device, *common_args], log_path=logs / "autoseg_train.log")
        ours.validation_dir = fold_dir / "validation"
        ours.training = autoseg_training_info(fold_dir)
        if test_ids:
            ours.test_dir = work / "predictions" / "autoseg_test"
            shutil.rmtree(ours.test_dir, ignore_errors=True)
            ours.stages["predict test"] = run_measured(
                [*cli, "predict", "-i", test_images, "-o", ours.test_dir, "-d", location.name, "-c", configuration,
                 "-f", str(fold), "--device", args.device, "-np", str(args.num_processes), *common_args],
                log_path=logs / "autoseg_predict.log")

    versions = {"autoseg": __version__}
    if not args.skip_nnunet:
        nnunet = NnUNet(Path(args.nnunet_venv), work / "nnunet", num_processes=args.num_processes, device=args.device)
        versions["nnunetv2"] = nnunet.version()
        name = nnunet.link_raw(location.raw)
        theirs.stages["plan"] = nnunet.fingerprint_and_plan(name)
        theirs.stages["preprocess"] = nnunet.preprocess(name, configuration)
        trained = nnunet.train_budget(name, configuration, fold, budget_s, splits=splits_file, overwrite=args.overwrite)
        theirs.stages["train"] = trained.measurement
        theirs.validation_dir = trained.validation_dir
        report = trained.report
        theirs.training = {"epochs": report.get("epochs_done"), "iterations": report.get("iterations_done"),
                           "training_ended_s": report.get("training_ended_s"),
                           "elapsed_s": report.get("validation_ended_s"),
                           "method": "nnunet_budget_driver.py (calibrated epochs x 50 iterations, poly LR)",
                           "report": report}
        if test_ids:
            theirs.test_dir = work / "predictions" / "nnunet_test"
            shutil.rmtree(theirs.test_dir, ignore_errors=True)
            theirs.stages["predict test"] = nnunet.predict(test_images, theirs.test_dir, name, configuration, fold)

    sets = {f"fold {fold} validation": (val_ids, location.raw / "labelsTr")}
    if test_ids:
        sets["test (imagesTs)"] = (test_ids, test_labels)
    problems: list[str] = []
    for side, key in ((ours, "autoseg"), (theirs, "nnunet")):
        for set_name, (ids, reference) in sets.items():
            predictions = side.validation_dir if set_name.startswith("fold") else side.test_dir
            if predictions is None:
                continue
            if not predictions.is_dir():
                problems.append(f"{side.name}: {predictions} missing; {set_name} not scored")
                continue
            slug = "val" if set_name.startswith("fold") else "test"
            side.scores[set_name] = score(predictions, reference, ids, work / "scoring" / f"{key}_{slug}", ending,
                                          args.num_processes)
            problems += [f"{side.name} {set_name}: {p}" for p in side.scores[set_name].get("problems", [])]

    label_names = {str(v): k for k, v in spec.labels.items()} if isinstance(spec.labels, dict) else {}
    return {
        "schema_version": 1, "dataset": location.name, "configuration": configuration, "architecture": architecture,
        "fold": fold, "budget": args.budget, "budget_s": budget_s, "device": args.device,
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine_description(), "versions": versions,
        "num_train": len(train_ids), "num_val": len(val_ids), "root": str(root),
        "labels": sorted(int(v) for v in label_names if int(v) != 0),
        "label_names": {k: v for k, v in label_names.items() if k != "0"},
        "sets": {name: {"num_cases": len(ids), "case_ids": list(ids)} for name, (ids, _) in sets.items()},
        "sides": {side.name: side.to_json() for side in (ours, theirs) if side.stages},
        "problems": problems,
    }


def merge_previous_side(result: dict[str, Any], previous: Mapping[str, Any]) -> dict[str, Any]:
    """Fill the side this run skipped (``--skip-ours``/``--skip-nnunet``) from an earlier run's JSON, so that one
    side can be re-run alone (e.g. after a fix to nnU-Net's budget driver) without re-training the other.

    Only when that run measured the same thing: dataset, configuration, fold, budget, device and case ids of every
    scored set must agree, otherwise the two sides would not be comparable and this raises BenchmarkError. The
    copied side keeps its own date, which the table prints."""
    for key in ("dataset", "configuration", "fold", "budget_s", "device", "sets"):
        if result.get(key) != previous.get(key):
            raise BenchmarkError(f"--other-side-from: that run's {key} ({previous.get(key)!r}) differs from this "
                                 f"run's ({result.get(key)!r}); the sides would not be comparable")
    merged = dict(result)
    merged["sides"] = dict(result["sides"])
    for name, side in previous.get("sides", {}).items():
        if name not in merged["sides"]:
            merged["sides"][name] = {**side, "from_run": previous.get("date")}
            for tool in ("autoseg", "nnunetv2"):
                if tool in previous.get("versions", {}) and tool not in merged["versions"]:
                    merged["versions"] = {**merged["versions"], tool: previous["versions"][tool]}
    return merged


def autoseg_training_info(fold_dir: Path) -> dict[str, Any]:
    """Epochs / iterations / elapsed seconds as our trainer recorded them (timing.json, training_log.json);
    missing fields stay absent: the table then says less, never something wrong."""
    info: dict[str, Any] = {"method": "autoseg train --time-budget"}
    timing = fold_dir / "timing.json"
    if timing.is_file():
        info["elapsed_s"] = json.loads(timing.read_text()).get("elapsed_s")
    curves = fold_dir / "training_log.json"
    if curves.is_file():
        data = json.loads(curves.read_text())
        epochs = data.get("epochs") if isinstance(data, dict) else None
        if isinstance(epochs, list):
            info["epochs"] = len(epochs)
    return info


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from autoseg.cli import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("dataset", help="dataset under --root (name/number), raw folder path, MSD task folder, or an "
                                        "oracle dataset (Dataset970_SynthMR) to regenerate")
    parser.add_argument("--budget", required=True, help="training wall-clock budget per side: 20m, 1h30m, 90s")
    parser.add_argument("--root", default=None, help="autoseg data root (default: $AUTOSEG_HOME or ./autoseg_data)")
    parser.add_argument("--fold", default="0", help="fold of autoseg's splits.json, used by both tools")
    parser.add_argument("--configuration", default=None, help="default: 3d_fullres, or 2d for 2D data")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for both tools")
    parser.add_argument("--skip-nnunet", action="store_true", help="run autoseg only")
    parser.add_argument("--skip-ours", action="store_true", help="run nnU-Net only (autoseg still plans: splits)")
    parser.add_argument("--no-test", action="store_true", help="do not predict/score imagesTs even when labelled")
    parser.add_argument("--n-cases", type=int, default=None,
                        help="oracle datasets only: generate this many training cases instead of the recipe's "
                             "(plumbing checks; results are then not comparable with the oracle)")
    parser.add_argument("--out", default=None, help=f"markdown table path (JSON beside it); default "
                                                    f"{DEFAULT_OUT_DIR.relative_to(REPO)}/<dataset>_<budget>.md")
    parser.add_argument("--workdir", default=None, help="nnU-Net folders, logs, scoring links (default: beside --out, work/)")
    parser.add_argument("--nnunet-venv", default=str(DEFAULT_NNUNET_VENV), help="venv with nnunetv2 installed")
    parser.add_argument("-np", "--num-processes", type=int, default=2,
                        help="worker processes for planning/preprocessing/prediction/scoring, both tools")
    parser.add_argument("--overwrite", action="store_true", help="delete existing fold results of both tools first")
    parser.add_argument("--other-side-from", default=None, metavar="JSON",
                        help="with --skip-ours/--skip-nnunet: take the skipped side from this earlier run's JSON "
                             "(same dataset, configuration, fold, budget, device and cases, else an error)")
    return parser.parse_args(argv)


def already_trained(*fold_dirs: Path | None) -> list[Path]:
    """The fold folders of this run (None: side skipped) that exist already."""
    return [d for d in fold_dirs if d is not None and d.exists()]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.skip_ours and args.skip_nnunet:
        print("accuracy.py: --skip-ours and --skip-nnunet together leave nothing to run", file=sys.stderr)
        return 2
    from autoseg.errors import AutosegError

    if args.other_side_from and not (args.skip_ours or args.skip_nnunet):
        print("accuracy.py: --other-side-from needs --skip-ours or --skip-nnunet", file=sys.stderr)
        return 2
    try:
        result = run(args)
        if args.other_side_from:
            result = merge_previous_side(result, json.loads(Path(args.other_side_from).read_text()))
    except (BenchmarkError, AutosegError) as exc:
        print(f"accuracy.py: error: {exc}", file=sys.stderr)
        return 1
    markdown = render_markdown(result)
    out = Path(args.out) if args.out else DEFAULT_OUT_DIR / f"{result['dataset']}_{args.budget}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    print(markdown)
    print(f"written: {out} and {out.with_suffix('.json')}")
    return 0 if not result["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
