"""nnU-Net v2 as a peer, driven from the outside: its commands, its public trainer class, its folders.

nnU-Net lives in its own venv (``bash ../shared/bench/setup_nnunet.sh .venv-nnunet``); nothing of it is imported
here. Typical use from a benchmark script (run as ``python benchmarks/<script>.py``)::

    from nnunet_side import NnUNet
    nn = NnUNet(Path(".venv-nnunet"), Path("bench_out/nnunet"))
    name = nn.link_raw(Path("autoseg_data/raw/Dataset970_SynthMR"))   # -> "Dataset970_SynthMR"
    nn.fingerprint_and_plan(970)                 # Measurement: wall_s, peak_rss_mb, peak_pss_mb
    nn.preprocess(970, "3d_fullres", num_processes=2)
    nn.write_splits(970, splits)                 # our splits.json folds -> its splits_final.json
    run = nn.train_budget(970, "3d_fullres", 0, budget_seconds=1200)
    run.validation_dir                           # nnU-Net's own fold_0/validation/ predictions
    nn.predict(images_ts, out_dir, 970, "3d_fullres", 0)

The three variables nnU-Net needs (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) point under ``workdir`` and
are passed in the environment of ITS subprocesses only; our own ``os.environ`` is never changed (autoseg reads
``nnUNet_raw`` as an extra raw location, so setting it here would change what our side sees).

Every command is measured by :func:`common.run_measured`: wall time of the whole command and the peak memory of
its whole process tree, sampled from /proc (psutil is not in our venv; ``/usr/bin/time -v`` would only give
the largest single process, not the tree with nnU-Net's data-augmentation and export workers).

Time-budgeted training: nnU-Net has no budget option, so :meth:`NnUNet.train_budget` runs
``nnunet_budget_driver.py`` (beside this file) with the nnU-Net venv's python; its docstring says exactly how
it drives ``nnUNetTrainer`` (fewer iterations per epoch, epoch count from a calibration, poly LR intact).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from common import BenchmarkError, Measurement, run_measured

DRIVER = Path(__file__).resolve().with_name("nnunet_budget_driver.py")
TRAINER = "nnUNetTrainer"  # nnU-Net's default trainer class
PLANS = "nnUNetPlans"  # nnU-Net's default plans identifier
TRAINER_FOLDER = "{trainer}__{plans}__{configuration}"  # results/<Dataset>/<this>/fold_<k> (nnU-Net's layout)


@dataclass
class BudgetTraining:
    """Result of :meth:`NnUNet.train_budget`."""

    measurement: Measurement  # the driver process: wall time from launch to the end of nnU-Net's validation
    fold_dir: Path
    validation_dir: Path
    report: dict[str, Any] = field(default_factory=dict)  # the driver's JSON report (calibration, plan, epochs)


class NnUNet:
    """nnU-Net v2 installed in ``venv``, with its three data folders under ``workdir``.

    ``num_processes``: default worker count for fingerprinting, preprocessing and prediction (nnU-Net's own
    defaults are 8 / 3, tuned for big machines; the benchmarks pass the same count to both tools).
    ``extra_env``: more variables for nnU-Net's processes, e.g. ``{"nnUNet_n_proc_DA": "2"}`` (data-augmentation
    workers; unset = nnU-Net's default, min(12, cpu count)) or ``{"nnUNet_def_n_proc": "2"}`` (its export pools).
    """

    def __init__(self, venv: Path, workdir: Path, num_processes: int = 2, device: str = "cpu",
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.venv = Path(venv).resolve()
        self.workdir = Path(workdir).resolve()
        self.num_processes = num_processes
        self.device = device
        self.extra_env = dict(extra_env or {})
        if not (self.venv / "bin" / "nnUNetv2_train").is_file():
            raise BenchmarkError(
                f"{self.venv}: no nnU-Net v2 installation found (expected bin/nnUNetv2_train); create it with "
                f"`bash ../shared/bench/setup_nnunet.sh {self.venv.name}` from the repository root"
            )
        self.raw, self.preprocessed, self.results = (self.workdir / n for n in
                                                      ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        self.logs = self.workdir / "logs"
        for folder in (self.raw, self.preprocessed, self.results, self.logs):
            folder.mkdir(parents=True, exist_ok=True)

    # --------------------------------------------------------------------------------------- environment
    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def command(self, name: str) -> Path:
        """Path of an nnU-Net console script, e.g. ``command("nnUNetv2_predict")``."""
        path = self.venv / "bin" / name
        if not path.is_file():
            raise BenchmarkError(f"{path}: nnU-Net command not found; is {self.venv} an nnU-Net v2 venv?")
        return path

    def env(self) -> dict[str, str]:
        """Environment for nnU-Net's subprocesses: ours plus its three folders (ours is not modified)."""
        env = dict(os.environ)
        env.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed),
                   nnUNet_results=str(self.results))
        env.update(self.extra_env)
        return env

    def version(self) -> str:
        """nnunetv2's installed version (read from the venv's package metadata)."""
        import subprocess

        result = subprocess.run([str(self.python), "-c", "import importlib.metadata as m; print(m.version('nnunetv2'))"],
                                capture_output=True, text=True, check=False)
        return result.stdout.strip() or "unknown"

    def _run(self, command: Sequence[str | os.PathLike], log_name: str, **kwargs: Any) -> Measurement:
        return run_measured(command, env=self.env(), log_path=self.logs / f"{log_name}.log", **kwargs)

    # ------------------------------------------------------------------------------------------ datasets
    def link_raw(self, raw_folder: Path) -> str:
        """Symlink a raw dataset folder (nnU-Net v2 layout, named ``DatasetXXX_Name``) into nnUNet_raw.

        Returns the folder name. An existing link to the same folder is kept; anything else there is an error.
        """
        raw_folder = Path(raw_folder).resolve()
        dataset_number(raw_folder.name)  # validates the name
        if not (raw_folder / "dataset.json").is_file():
            raise BenchmarkError(f"{raw_folder}: no dataset.json; expected a raw dataset in the nnU-Net v2 layout")
        link = self.raw / raw_folder.name
        if link.is_symlink() or link.exists():
            if link.resolve() == raw_folder:
                return raw_folder.name
            if link.is_symlink():
                link.unlink()  # a stale link from an earlier run (e.g. another --root): ours to replace
            else:
                raise BenchmarkError(f"{link}: exists and is not a link to {raw_folder}; remove it or use another workdir")
        link.symlink_to(raw_folder, target_is_directory=True)
        return raw_folder.name

    def dataset_name(self, dataset_id: int | str) -> str:
        """``970`` -> ``Dataset970_SynthMR`` (the folder linked into nnUNet_raw)."""
        if isinstance(dataset_id, str) and dataset_id.startswith("Dataset"):
            return dataset_id
        number = int(dataset_id)
        found = sorted(p.name for p in self.raw.glob(f"Dataset{number:03d}_*"))
        if len(found) != 1:
            raise BenchmarkError(f"{self.raw}: expected one Dataset{number:03d}_* folder, found {found or 'none'}; "
                                 "link the raw dataset first (NnUNet.link_raw)")
        return found[0]

    def preprocessed_dir(self, dataset_id: int | str) -> Path:
        return self.preprocessed / self.dataset_name(dataset_id)

    def fold_dir(self, dataset_id: int | str, configuration: str, fold: int | str) -> Path:
        return nnunet_fold_dir(self.workdir, self.dataset_name(dataset_id), configuration, fold)

    # ---------------------------------------------------------------------------------------- commands
    def fingerprint_and_plan(self, dataset_id: int | str, num_processes: int | None = None) -> Measurement:
        """Fingerprint + experiment planning in one process: ``nnUNetv2_plan_and_preprocess -d ID --no_pp
        --clean -npfp N`` (``--clean``: always re-extract, so reruns time the same work)."""
        return self._run([self.command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_number_of(dataset_id)),
                          "--no_pp", "--clean", "-npfp", str(num_processes or self.num_processes)],
                         f"plan_{dataset_id}")

    def preprocess(self, dataset_id: int | str, config: str, num_processes: int | None = None) -> Measurement:
        """``nnUNetv2_preprocess -d ID -c CONFIG -np N``."""
        return self._run([self.command("nnUNetv2_preprocess"), "-d", str(dataset_number_of(dataset_id)), "-c", config,
                          "-np", str(num_processes or self.num_processes)], f"preprocess_{dataset_id}_{config}")

    def write_splits(self, dataset_id: int | str, splits: Sequence[Mapping[str, Sequence[str]]] | Path) -> Path:
        """Write our folds (a list of ``{"train": [...], "val": [...]}``, or the path of our splits.json) as
        nnU-Net's ``splits_final.json`` in its preprocessed folder, so both tools train and validate on the same
        cases. Every case must exist in nnU-Net's preprocessed data (checked when it is there)."""
        folds = load_splits_file(splits) if isinstance(splits, (str, Path)) else [dict(f) for f in splits]
        validate_splits(folds)
        folder = self.preprocessed_dir(dataset_id)
        folder.mkdir(parents=True, exist_ok=True)
        plans_file = folder / f"{PLANS}.json"
        if plans_file.is_file():
            known = nnunet_case_ids(folder, json.loads(plans_file.read_text()))
            if known:
                missing = sorted({c for f in folds for c in f["train"] + f["val"]} - known)
                if missing:
                    raise BenchmarkError(f"{folder}: splits name case(s) nnU-Net did not preprocess: {missing[:5]}; "
                                         "both tools must see the same raw dataset")
        path = folder / "splits_final.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps([{"train": list(f["train"]), "val": list(f["val"])} for f in folds], indent=1))
        tmp.replace(path)
        return path

    def train_budget(self, dataset_id: int | str, config: str, fold: int | str, budget_seconds: float,
                     splits: Sequence[Mapping[str, Sequence[str]]] | Path | None = None,
                     iterations_per_epoch: int = 50, overwrite: bool = False) -> BudgetTraining:
        """Train nnU-Net's default trainer on one fold within ``budget_seconds`` of wall-clock time, counted from
        the launch of its process to the end of its own final validation (see nnunet_budget_driver.py).

        ``splits``: our folds, written as splits_final.json first (see :meth:`write_splits`).
        ``overwrite``: delete an existing fold folder first; without it an existing folder is an error, so a
        benchmark never silently mixes two runs.
        """
        if splits is not None:
            self.write_splits(dataset_id, splits)
        fold_dir = self.fold_dir(dataset_id, config, fold)
        if fold_dir.exists():
            if not overwrite:
                raise BenchmarkError(f"{fold_dir}: a trained fold is already there; pass overwrite=True "
                                     "(accuracy.py: --overwrite) to train again, or use another workdir")
            shutil.rmtree(fold_dir)
        report_path = self.logs / f"train_{dataset_id}_{config}_fold{fold}_report.json"
        report_path.unlink(missing_ok=True)
        command = [self.python, DRIVER, str(dataset_number_of(dataset_id)), config, str(fold),
                   "--budget-seconds", f"{budget_seconds:.3f}", "--started-at", f"{time.time():.3f}",
                   "--device", self.device, "--iterations-per-epoch", str(iterations_per_epoch),
                   "--report", report_path]
        measurement = self._run(command, f"train_{dataset_id}_{config}_fold{fold}")
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        return BudgetTraining(measurement, fold_dir, fold_dir / "validation", report)

    def predict(self, input_dir: Path, output_dir: Path, dataset_id: int | str, config: str, fold: int | str,
                num_processes_preprocessing: int = 1, num_processes_export: int = 1) -> Measurement:
        """``nnUNetv2_predict -i IN -o OUT -d ID -c CONFIG -f FOLD -device DEV -npp 1 -nps 1`` (checkpoint_final,
        mirroring and step 0.5: nnU-Net's defaults; 1 + 1 workers as in shared/bench/README.md)."""
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        return self._run([self.command("nnUNetv2_predict"), "-i", input_dir, "-o", output_dir,
                          "-d", str(dataset_number_of(dataset_id)), "-c", config, "-f", str(fold),
                          "-device", self.device, "-npp", str(num_processes_preprocessing),
                          "-nps", str(num_processes_export)], f"predict_{dataset_id}_{config}_fold{fold}")


# -------------------------------------------------------------------------------------- pure helpers
def nnunet_fold_dir(workdir: Path, dataset_name: str, configuration: str, fold: int | str) -> Path:
    """``<workdir>/nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>/fold_<k>`` (nnU-Net's layout)."""
    folder = TRAINER_FOLDER.format(trainer=TRAINER, plans=PLANS, configuration=configuration)
    return Path(workdir) / "nnUNet_results" / dataset_name / folder / f"fold_{fold}"


def dataset_number(folder_name: str) -> int:
    """``"Dataset970_SynthMR"`` -> 970; anything else raises (nnU-Net finds datasets by this pattern only)."""
    import re

    match = re.fullmatch(r"Dataset(\d{3})_(.+)", folder_name)
    if not match:
        raise BenchmarkError(f"{folder_name!r}: nnU-Net needs a dataset folder named DatasetXXX_Name "
                             "(three digits); rename or link it under that name")
    return int(match.group(1))


def dataset_number_of(dataset_id: int | str) -> int:
    """970, "970", "Dataset970_SynthMR" -> 970."""
    if isinstance(dataset_id, str) and dataset_id.startswith("Dataset"):
        return dataset_number(dataset_id)
    return int(dataset_id)


def load_splits_file(path: Path) -> list[dict[str, list[str]]]:
    """Read a splits.json (ours or nnU-Net's: the same format) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no splits file; run `autoseg plan` first (it writes splits.json)")
    folds = json.loads(path.read_text())
    validate_splits(folds, source=str(path))
    return folds


def validate_splits(folds: Any, source: str = "splits") -> None:
    """A non-empty list of ``{"train": [str...], "val": [str...]}``; raises BenchmarkError naming the problem."""
    if not isinstance(folds, list) or not folds:
        raise BenchmarkError(f"{source}: expected a non-empty list of folds, found {type(folds).__name__}")
    for index, fold in enumerate(folds):
        if not isinstance(fold, Mapping) or set(fold) < {"train", "val"}:
            raise BenchmarkError(f"{source}: fold {index} must have 'train' and 'val' lists, found {fold!r:.80}")
        for key in ("train", "val"):
            if not isinstance(fold[key], list) or not all(isinstance(c, str) for c in fold[key]):
                raise BenchmarkError(f"{source}: fold {index} '{key}' must be a list of case identifiers")


def nnunet_case_ids(preprocessed_dataset_dir: Path, plans: Mapping[str, Any]) -> set[str]:
    """Case identifiers nnU-Net preprocessed for any configuration (``<case>.pkl`` beside its arrays); empty
    when nothing is preprocessed yet. Only file names are read (the .pkl files are never loaded)."""
    ids: set[str] = set()
    for configuration in plans.get("configurations", {}).values():
        identifier = configuration.get("data_identifier")
        if identifier and (preprocessed_dataset_dir / identifier).is_dir():
            ids |= {p.name[:-4] for p in (preprocessed_dataset_dir / identifier).glob("*.pkl")}
    return ids
