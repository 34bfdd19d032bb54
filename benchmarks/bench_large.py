"""Large many-class CT data, autoseg beside nnU-Net v2 in one run: plan + preprocess, train step, predict.

Data: ``--cases`` CT phantoms (autoseg.dataset.phantom_ct) of about ``--slices`` x ``--in-plane``^2 voxels at
``--scale`` 1 (default 4 cases of 380-420 x 512 x 512, 0.7-0.9 mm in-plane, 1-1.5 mm slices) with
``--classes`` labels (default 32), generated once under ``--work``. ``--scale`` shrinks the voxel counts and
coarsens the spacing by the same factor (same anatomy in mm) for runs that must fit a small machine.

Each stage is one subprocess per tool, measured by ``common.run_measured`` (wall time of the whole command and
the peak RSS of its whole process tree, sampled from /proc). The tools alternate within every round (A B,
then B A the next round, so neither always runs on a warmer or quieter machine) and the table gives the median
over ``--repeats`` rounds for the stages that are repeated (plan + preprocess, predict); training runs once.

| stage | autoseg | nnU-Net v2 |
|---|---|---|
| plan | ``autoseg plan D --configs 3d_fullres --arch unet --no-preprocess -np N`` | ``nnUNetv2_plan_and_preprocess -d ID --no_pp --clean -npfp N`` |
| preprocess | ``autoseg preprocess D -c 3d_fullres -np N`` | ``nnUNetv2_preprocess -d ID -c 3d_fullres -np N`` |
| disk | size of ``preprocessed/D/`` | size of ``nnUNet_preprocessed/D/`` |
| train | our trainer (``autoseg.cli.main(["train", ...])``), 1 epoch x ``--train-iters``, ``--no-validation`` | ``nnUNetTrainer`` built as ``nnUNetv2_train`` builds it, 1 epoch x ``--train-iters`` (val iterations 1:5), ``run_training()`` only |
| predict | ``autoseg predict -i ONE_CASE -d D -c 3d_fullres -f 0 --device cpu [--no-mirror] -np 2`` | ``nnUNetv2_predict -i ONE_CASE -d ID -c 3d_fullres -f 0 -device cpu -npp 1 -nps 1 [--disable_tta]`` |

Both train on fold 0 of OUR splits.json (written as nnU-Net's splits_final.json), each at its OWN 3d_fullres
plan (patch, batch, network); the step time is the median over the timed steps after the first of each tool's
own train-step function (ours ``autoseg.training.loop.train_step``, nnU-Net's ``nnUNetTrainer.train_step``),
timed by a wrapper that calls it unchanged. The few iterations exist to time steps and to give each predictor a
trained model; accuracy is not measured here. Both tools get the same worker count ``-np`` (nnU-Net's data
augmentation workers via ``nnUNet_n_proc_DA``).

Without ``--nnunet-venv`` (or when it holds no nnU-Net) only our side runs, and the table says so. Output: a
markdown table (printed and written to ``--out``), with the ratio ours / nnU-Net and the targets of issue 17
beside it, and the full measurements as JSON next to it.

    python benchmarks/bench_large.py --nnunet-venv .venv-nnunet --out bench_out/large.md        # full size
    python benchmarks/bench_large.py --nnunet-venv .venv-nnunet --scale 0.125 --train-iters 3 \\
        --repeats 1 --out bench_out/large_small.md                           # 2-core machine: ~16 min
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchmarkError, Measurement, machine_description, markdown_table, run_measured  # noqa: E402
from nnunet_side import dataset_number  # noqa: E402

DATASET = "Dataset951_CTPhantomLarge"
CONFIG = "3d_fullres"
OURS, NNUNET = "autoseg", "nnU-Net v2"

# (metric key, row label, target text, target as the largest allowed ours / nnU-Net ratio; None: no target)
ROWS: list[tuple[str, str, str, float | None]] = [
    ("plan_preprocess.wall_s", "plan + preprocess: wall s", "<= 0.5x", 0.5),
    ("plan_preprocess.peak_rss_mb", "plan + preprocess: peak RSS MB", "<= 0.5x", 0.5),
    ("disk_mb", "preprocessed data on disk MB", "<= 1.0x", 1.0),
    ("train.step_s", "train: s per step (median)", "-", None),
    ("train.wall_s", "train: wall s (whole command)", "-", None),
    ("train.peak_rss_mb", "train: peak RSS MB", "<= 0.5x", 0.5),
    ("predict_nomirror.wall_s", "predict, mirroring off: wall s", "<= 0.67x (>= 1.5x speed)", 1 / 1.5),
    ("predict_nomirror.peak_rss_mb", "predict, mirroring off: peak RSS MB", "<= 0.5x", 0.5),
    ("predict_mirror.wall_s", "predict, mirroring on: wall s", "<= 0.67x (>= 1.5x speed)", 1 / 1.5),
    ("predict_mirror.peak_rss_mb", "predict, mirroring on: peak RSS MB", "<= 0.5x", 0.5),
]

OURS_TRAIN = r"""
import json, sys, time
from autoseg.training import loop
from autoseg.cli import main
report, argv = sys.argv[1], sys.argv[2:]
times = []
step = loop.train_step
def timed(*args, **kwargs):  # our own step, called unchanged; only its duration is recorded
    start = time.perf_counter()
    result = step(*args, **kwargs)
    times.append(time.perf_counter() - start)
    return result
loop.train_step = timed
code = main(argv)
json.dump({"step_times": times, "returncode": code}, open(report, "w"))
sys.exit(code)
"""

# run with the nnU-Net venv's python: its default trainer built as nnUNetv2_train builds it (CPU), one short
# epoch, its own run_training() (which saves checkpoint_final.pth); no final validation
NNUNET_TRAIN = r"""
import json, multiprocessing, os, sys, time
import torch
from nnunetv2.run.run_training import get_trainer_from_args
dataset_id, iterations, report = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(multiprocessing.cpu_count())
trainer = get_trainer_from_args(dataset_id, "3d_fullres", 0, "nnUNetTrainer", "nnUNetPlans", False,
                                device=torch.device("cpu"))
trainer.num_epochs = 1
trainer.num_iterations_per_epoch = iterations
trainer.num_val_iterations_per_epoch = max(1, round(iterations / 5))
times = []
step = trainer.train_step
def timed(batch):  # nnU-Net's own step, called unchanged; only its duration is recorded
    start = time.perf_counter()
    result = step(batch)
    times.append(time.perf_counter() - start)
    return result
trainer.train_step = timed
trainer.run_training()
plans = trainer.configuration_manager
json.dump({"step_times": times, "returncode": 0, "patch_size": list(plans.patch_size),
           "batch_size": plans.batch_size}, open(report, "w"))
sys.stdout.flush()
for child in multiprocessing.active_children():  # augmentation workers must not outlive the measurement
    child.terminate()
os._exit(0)
"""


@dataclass
class StageResult:
    """One tool's measurements of one stage over the rounds (seconds, MiB)."""

    wall_s: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    peak_pss_mb: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)

    def add(self, *measurements: Measurement) -> None:
        """Record one round made of consecutive commands: their summed wall time, their largest peak."""
        self.wall_s.append(sum(m.wall_s for m in measurements))
        self.peak_rss_mb.append(max(m.peak_rss_mb for m in measurements))
        self.peak_pss_mb.append(max(m.peak_pss_mb for m in measurements))

    def summary(self) -> dict[str, float | None]:
        """Median wall time over rounds, largest peak memory over rounds, median step time."""
        return {
            "wall_s": statistics.median(self.wall_s) if self.wall_s else None,
            "peak_rss_mb": max(self.peak_rss_mb) if self.peak_rss_mb else None,
            "peak_pss_mb": max(self.peak_pss_mb) if self.peak_pss_mb else None,
            "step_s": statistics.median(self.step_s) if self.step_s else None,
        }


# ------------------------------------------------------------------------------------------ pure helpers
def folder_mb(path: Path) -> float:
    """Bytes of the regular files under ``path`` (links not followed), in MiB; 0 when absent."""
    total = 0
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                file = Path(root) / name
                if not file.is_symlink():
                    total += file.stat().st_size
    return total / 2**20


def round_order(sides: Sequence[str], round_index: int) -> list[str]:
    """A B in even rounds, B A in odd ones: alternation without always giving one tool the first slot."""
    return list(sides) if round_index % 2 == 0 else list(reversed(sides))


def lookup(summary: dict[str, Any], key: str) -> float | None:
    """``"train.step_s"`` -> ``summary["train"]["step_s"]``; None when any part is missing."""
    value: Any = summary
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"


def results_table(ours: dict[str, Any], theirs: dict[str, Any] | None) -> str:
    """Markdown: one row per metric with both values, ours / nnU-Net, the target and whether it is met."""
    rows = []
    for key, label, target_text, target in ROWS:
        mine = lookup(ours, key)
        other = lookup(theirs, key) if theirs is not None else None
        ratio = mine / other if mine is not None and other else None
        met = "-" if ratio is None or target is None else ("yes" if ratio <= target + 1e-9 else "no")
        rows.append([label, _cell(mine), _cell(other) if theirs is not None else "not run",
                     f"{ratio:.2f}x" if ratio is not None else "-", target_text, met])
    return markdown_table(["metric", OURS, NNUNET, "ours / nnU-Net", "target", "met"], rows, align="lrrrrr")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_out/large"), help="data, both tools' folders, logs")
    parser.add_argument("--out", type=Path, default=Path("bench_out/large.md"), help="markdown table (+ .json)")
    parser.add_argument("--nnunet-venv", type=Path, default=None, help="venv with nnunetv2 (absent: ours only)")
    parser.add_argument("--cases", type=int, default=4, help="phantom cases")
    parser.add_argument("--classes", type=int, default=32, help="foreground classes")
    parser.add_argument("--slices", type=int, nargs=2, default=[380, 420], metavar=("LO", "HI"),
                        help="slice count range at scale 1")
    parser.add_argument("--in-plane", type=int, default=512, help="in-plane pixels at scale 1")
    parser.add_argument("--slice-spacing", type=float, nargs=2, default=[1.0, 1.5], metavar=("LO", "HI"),
                        help="slice spacing range in mm at scale 1")
    parser.add_argument("--scale", type=float, default=1.0, help="voxel counts x scale, spacing / scale")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of plan+preprocess and predict (median)")
    parser.add_argument("--train-iters", type=int, default=5, help="training iterations per tool (1 epoch)")
    parser.add_argument("-np", "--num-workers", type=int, default=2, help="workers for both tools")
    parser.add_argument("--skip-train-predict", action="store_true", help="plan + preprocess + disk only")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    args = parser.parse_args(argv)
    if args.cases < 2:
        parser.error("--cases must be at least 2 (fold 0 needs a training and a validation case)")
    if args.repeats < 1 or args.train_iters < 1:
        parser.error("--repeats and --train-iters must be at least 1")
    return args


def phantom_spec(args: argparse.Namespace):
    from autoseg.dataset.phantom_ct import PhantomSpec

    return PhantomSpec(num_cases=args.cases, num_classes=args.classes, slices=tuple(args.slices),
                       in_plane=args.in_plane, slice_spacing_mm=tuple(args.slice_spacing), scale=args.scale,
                       seed=args.seed)


# ----------------------------------------------------------------------------------------------- sides
class Ours:
    """autoseg through its CLI, data root ``work/autoseg_root``."""

    name = OURS

    def __init__(self, work: Path, num_workers: int) -> None:
        self.root = work / "autoseg_root"
        self.logs = work / "logs"
        self.num_workers = num_workers
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}

    def _cli(self, *arguments: str) -> list[str]:
        return [sys.executable, "-m", "autoseg", "--root", str(self.root), *arguments]

    def _run(self, command: list[str], log: str) -> Measurement:
        return run_measured(command, env=self.env, log_path=self.logs / f"ours_{log}.log")

    def plan_preprocess(self) -> tuple[Measurement, Measurement]:
        shutil.rmtree(self.root / "preprocessed" / DATASET, ignore_errors=True)
        # --arch unet: nnU-Net plans its plain U-Net only; our other architectures are not part of this race
        plan = self._run(self._cli("plan", DATASET, "--configs", CONFIG, "--arch", "unet", "--no-preprocess", "-np",
                                   str(self.num_workers)), "plan")
        preprocess = self._run(self._cli("preprocess", DATASET, "-c", CONFIG, "-np", str(self.num_workers)),
                               "preprocess")
        return plan, preprocess

    def disk_mb(self) -> float:
        return folder_mb(self.root / "preprocessed" / DATASET)

    def train(self, iterations: int) -> tuple[Measurement, list[float]]:
        report = self.logs / "ours_train_report.json"
        shutil.rmtree(self.root / "results" / DATASET, ignore_errors=True)
        command = [sys.executable, "-c", OURS_TRAIN, str(report), "--root", str(self.root), "train", DATASET, CONFIG,
                   "0", "--epochs", "1", "--iters-per-epoch", str(iterations), "--device", "cpu", "--no-validation",
                   "-np", str(self.num_workers)]
        measurement = self._run(command, "train")
        return measurement, json.loads(report.read_text())["step_times"]

    def predict(self, input_dir: Path, output_dir: Path, mirror: bool) -> Measurement:
        shutil.rmtree(output_dir, ignore_errors=True)
        command = self._cli("predict", "-i", str(input_dir), "-o", str(output_dir), "-d", DATASET, "-c", CONFIG,
                            "-f", "0", "--device", "cpu", "-np", str(self.num_workers))
        return self._run(command + ([] if mirror else ["--no-mirror"]), f"predict_{'mirror' if mirror else 'nomirror'}")


class TheirSide:
    """nnU-Net v2 through nnunet_side.NnUNet (its commands, its folders under ``work/nnunet``)."""

    name = NNUNET

    def __init__(self, venv: Path, work: Path, num_workers: int, raw: Path) -> None:
        from nnunet_side import NnUNet

        self.nn = NnUNet(venv, work / "nnunet", num_processes=num_workers,
                         extra_env={"nnUNet_n_proc_DA": str(num_workers), "nnUNet_def_n_proc": str(num_workers)})
        self.dataset = self.nn.link_raw(raw)
        self.logs = self.nn.logs

    def plan_preprocess(self) -> tuple[Measurement, Measurement]:
        return self.nn.fingerprint_and_plan(self.dataset), self.nn.preprocess(self.dataset, CONFIG)

    def disk_mb(self) -> float:
        return folder_mb(self.nn.preprocessed_dir(self.dataset))

    def train(self, iterations: int, splits: Path) -> tuple[Measurement, list[float]]:
        self.nn.write_splits(self.dataset, splits)
        shutil.rmtree(self.nn.fold_dir(self.dataset, CONFIG, 0), ignore_errors=True)
        report = self.logs / "nnunet_train_report.json"
        report.unlink(missing_ok=True)
        measurement = run_measured([self.nn.python, "-c", NNUNET_TRAIN, str(dataset_number(self.dataset)),
                                    str(iterations), str(report)], env=self.nn.env(),
                                   log_path=self.logs / "nnunet_train.log")
        return measurement, json.loads(report.read_text())["step_times"]

    def predict(self, input_dir: Path, output_dir: Path, mirror: bool) -> Measurement:
        shutil.rmtree(output_dir, ignore_errors=True)
        output_dir.mkdir(parents=True)
        command = [self.nn.command("nnUNetv2_predict"), "-i", input_dir, "-o", output_dir,
                   "-d", str(dataset_number(self.dataset)), "-c", CONFIG, "-f", "0", "-device", "cpu",
                   "-npp", "1", "-nps", "1"] + ([] if mirror else ["--disable_tta"])
        return run_measured(command, env=self.nn.env(),
                            log_path=self.logs / f"predict_{'mirror' if mirror else 'nomirror'}.log")


# ------------------------------------------------------------------------------------------------ run
def prepare_data(args: argparse.Namespace, raw: Path) -> dict[str, Any]:
    """Generate the phantoms unless the same spec already lies there; returns the spec as a dict."""
    from autoseg.dataset.phantom_ct import generate_ct_phantoms

    spec = phantom_spec(args)
    marker = raw / "phantom_spec.json"
    wanted = json.dumps(asdict(spec), sort_keys=True)
    if not (marker.is_file() and marker.read_text() == wanted):
        shutil.rmtree(raw, ignore_errors=True)
        generate_ct_phantoms(raw, spec)
        marker.write_text(wanted)
    return asdict(spec)


def one_case_folder(raw: Path, folder: Path) -> Path:
    """A folder holding (a link to) the first training image: the case both tools predict."""
    image = sorted((raw / "imagesTr").iterdir())[0]
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / image.name
    if not link.exists():
        link.symlink_to(image.resolve())
    return folder


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = args.work.resolve()
    raw = work / "autoseg_root" / "raw" / DATASET
    started = time.perf_counter()
    spec = prepare_data(args, raw)
    generation_s = time.perf_counter() - started
    sides: dict[str, Any] = {OURS: Ours(work, args.num_workers)}
    notes = [f"phantoms generated in {generation_s:.0f} s (or reused)"]
    if args.nnunet_venv is not None:
        try:
            sides[NNUNET] = TheirSide(args.nnunet_venv, work, args.num_workers, raw)
            notes.append(f"nnU-Net {sides[NNUNET].nn.version()} from {args.nnunet_venv}")
        except BenchmarkError as exc:
            notes.append(f"nnU-Net NOT run: {str(exc).splitlines()[0]}")
    else:
        notes.append("nnU-Net NOT run: no --nnunet-venv given (autoseg side only)")
    results = {name: {"plan_preprocess": StageResult(), "train": StageResult(), "predict_nomirror": StageResult(),
                      "predict_mirror": StageResult()} for name in sides}
    disk: dict[str, float] = {}

    for round_index in range(args.repeats):
        for name in round_order(list(sides), round_index):
            results[name]["plan_preprocess"].add(*sides[name].plan_preprocess())
            disk[name] = sides[name].disk_mb()
    splits = sides[OURS].root / "preprocessed" / DATASET / "splits.json"

    if not args.skip_train_predict:
        for name in round_order(list(sides), 0):
            train_args = (args.train_iters,) if name == OURS else (args.train_iters, splits)
            measurement, steps = sides[name].train(*train_args)
            results[name]["train"].add(measurement)
            results[name]["train"].step_s.extend(steps[1:] or steps)  # the first step warms caches up
        input_dir = one_case_folder(raw, work / "predict_input")
        for round_index in range(args.repeats):
            for mirror in (False, True):
                for name in round_order(list(sides), round_index):
                    out = work / "predictions" / name.replace(" ", "_") / ("mirror" if mirror else "nomirror")
                    stage = "predict_mirror" if mirror else "predict_nomirror"
                    results[name][stage].add(sides[name].predict(input_dir, out, mirror))

    summaries = {name: {stage: result.summary() for stage, result in stages.items()} for name, stages in results.items()}
    for name in sides:
        summaries[name]["disk_mb"] = disk.get(name)
    return {"spec": spec, "notes": notes, "summaries": summaries,
            "raw": {name: {stage: asdict(r) for stage, r in stages.items()} for name, stages in results.items()}}


def report_text(args: argparse.Namespace, result: dict[str, Any], command: str) -> str:
    from autoseg.dataset.phantom_ct import PhantomSpec, case_grid

    import numpy as np

    spec = PhantomSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in result["spec"].items()})
    grids = [case_grid(spec, np.random.default_rng([spec.seed, i])) for i in range(spec.num_cases)]
    shapes = ", ".join("x".join(str(n) for n in shape) for shape, _ in grids)
    spacing = grids[0][1]
    machine = machine_description()
    summaries = result["summaries"]
    lines = [
        f"## Large CT phantoms: autoseg vs nnU-Net v2 ({time.strftime('%Y-%m-%d', time.gmtime())})",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, CPU only (shared).",
        f"Data: {spec.num_cases} cases ({shapes} voxels; case 0 spacing "
        f"{' x '.join(f'{s:.2f}' for s in spacing)} mm), {spec.num_classes} classes, scale {spec.scale}.",
        f"Rounds: {args.repeats} (plan + preprocess, predict; median wall, largest peak); training "
        f"{args.train_iters} iterations once per tool; {args.num_workers} workers each.",
        f"Command: `{command}`",
        "",
        results_table(summaries[OURS], summaries.get(NNUNET)),
        "",
    ]
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/bench_large.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run(args)
    text = report_text(args, result, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
