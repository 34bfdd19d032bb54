"""kill -9 at random moments of `autoseg plan`, `autoseg train` and `autoseg predict`, rerun, and compare the final
state with an uninterrupted run (issue 18 item 4).

On a tiny synthetic dataset (``autoseg.dataset.synthetic``) the script first runs the three stages once without
interruption (the reference) and times them. Trial *i* then takes stage ``STAGES[i % 3]`` (so each stage gets a
third of the trials), starts it in a fresh data root holding the reference's inputs of that stage, sends SIGKILL
to the command's own process (not its process group: its worker processes must die by themselves,
``autoseg.workers``) after a delay drawn uniformly from 5-90 % of the reference time with ``random.Random(seed + i)``,
and reruns the same command (train with ``continue_training``: what ``--continue`` runs; train is started
through ``autoseg.training.train`` so that it checkpoints every epoch and every second, see ``stage_command``). The moment is random; the checks are on the final state
only:

- identical: plan: every file under ``preprocessed/<D>/`` byte-equal to the reference's (``.lock`` files
  excepted: they stay by design, ``autoseg.locks``); train: every tensor of ``checkpoint_final.pt``'s network
  state equal to the reference's (bit for bit, ``torch.equal``); predict: every output segmentation's array and
  geometry equal to the reference's.
- temp files: files named ``*.partial*`` (``autoseg.fileio`` temp names) anywhere in the trial's root.
- slow to die: processes of the killed command's process group still alive 3 s after the kill (``KILL_GRACE_S``;
  pool workers with ``PR_SET_PDEATHSIG`` are gone at once, torch DataLoader workers within their 5 s watchdog).
- orphans: processes of the killed command's process group still alive 12 s after the kill (``ORPHAN_WAIT_S``),
  plus any process naming the trial's root still alive after the rerun returned.

Usage: ``python benchmarks/faults.py --work /tmp/faults --trials 20 [--seed 0] [--epochs 2] [--iters 3]``; prints a
markdown table (and writes ``faults.json`` in ``--work``). ``run_benchmark`` is the same from Python
(tests/pipeline/test_faults.py runs a CI-sized version).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

DATASET = "Dataset990_Faults"
CONFIGURATION = "3d_fullres"
STAGES = ("plan", "train", "predict")
TRAIN_CHECKPOINT_INTERVAL_S = 1.0  # mid-epoch checkpoints, so that kills also test resuming inside an epoch
KILL_GRACE_S = 3.0  # how long the killed command's workers get to notice (PR_SET_PDEATHSIG is immediate)
# torch DataLoader workers notice a dead parent only through their watchdog, polled every 5 s
# (torch.utils.data._utils.MP_STATUS_CHECK_INTERVAL); a process alive this long after the kill stays for good
ORPHAN_WAIT_S = 12.0
ORPHAN_CHECK_S = 3.0


@dataclass
class Trial:
    index: int
    stage: str
    kill_after_s: float
    interrupted: bool  # False: the command had finished before the kill moment
    found_work: bool  # the killed run left finished work for the rerun to keep (cases, a checkpoint, outputs)
    identical: bool
    temp_files: list[str] = field(default_factory=list)
    orphans: int = 0  # processes of the killed command alive ORPHAN_WAIT_S after the kill, or after the rerun
    slow_to_die: int = 0  # processes of the killed command alive KILL_GRACE_S after the kill (gone later or not)
    rerun_returncode: int = 0
    detail: str = ""


# ------------------------------------------------------------------------------------------ commands
def _autoseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "autoseg", *args]


def stage_command(stage: str, root: Path, epochs: int, iters: int, resume: bool = False) -> list[str]:
    if stage == "plan":
        # fingerprint + plans + preprocessing of one configuration, 2 worker processes (the CLI's default)
        return _autoseg("plan", DATASET, "--root", str(root), "--configs", CONFIGURATION, "--arch", "unet",
                        "--gpu-memory", "8")
    if stage == "train":
        # `autoseg train` itself saves checkpoint_latest.pt every 50 epochs or 5 minutes, so a run of a few
        # epochs would only ever restart from scratch and --continue's resume would go untested. The same
        # function with its keyword-only checkpoint knobs saves after every epoch and every
        # TRAIN_CHECKPOINT_INTERVAL_S, mid-epoch too. Default loader workers (2); no final validation: it changes
        # no weight and only lengthens the run.
        call = (f"from autoseg.training import train; train({DATASET!r}, {CONFIGURATION!r}, '0', root={str(root)!r}, "
                f"epochs={epochs}, iterations_per_epoch={iters}, device='cpu', validate=False, "
                f"continue_training={resume}, checkpoint_every=1, checkpoint_interval_s={TRAIN_CHECKPOINT_INTERVAL_S})")
        return [sys.executable, "-c", call]
    if stage == "predict":
        return _autoseg("predict", "-i", str(root / "raw" / DATASET / "imagesTs"), "-o", str(root / "prediction"),
                        "-d", DATASET, "-c", CONFIGURATION, "-f", "0", "--device", "cpu", "--root", str(root))
    raise ValueError(stage)


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # deterministic and polite on a shared machine
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(command: list[str], log: Path) -> tuple[int, float]:
    start = time.monotonic()
    with open(log, "ab") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=_environment(),
                               start_new_session=True)
    return code, time.monotonic() - start


def _process_group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) whose process group is ``pgid``, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _kill_at(command: list[str], delay_s: float, log: Path) -> tuple[bool, int, int]:
    """Start ``command``, SIGKILL its main process after ``delay_s``; ``(interrupted, processes alive
    KILL_GRACE_S after the kill, processes alive ORPHAN_WAIT_S after it)``."""
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=_environment(),
                                   start_new_session=True)
        try:
            process.wait(timeout=delay_s)
            return False, 0, 0
        except subprocess.TimeoutExpired:
            pass
        process.send_signal(signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + KILL_GRACE_S
    while _process_group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    slow = len(_process_group_members(process.pid))
    deadline = time.monotonic() + ORPHAN_WAIT_S - KILL_GRACE_S
    while _process_group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = _process_group_members(process.pid)
    for pid in survivors:  # do not let them disturb the rerun; they are counted
        os.kill(pid, signal.SIGKILL)
    return True, slow, len(survivors)


# ------------------------------------------------------------------------------------------ state
def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("*.lock"))


def _prepare_root(stage: str, reference: Path, root: Path) -> None:
    """The trial root holds what the stage reads, copied from the reference (never its outputs)."""
    _copy_tree(reference / "raw", root / "raw")
    if stage in ("train", "predict"):
        _copy_tree(reference / "preprocessed", root / "preprocessed")
    if stage == "predict":
        _copy_tree(reference / "results", root / "results")


def _temp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.partial*"))


def _compare_plan(reference: Path, root: Path) -> str:
    def files(base: Path) -> dict[str, bytes]:
        folder = base / "preprocessed" / DATASET
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file() and not p.name.endswith(".lock")}

    expected, found = files(reference), files(root)
    if expected.keys() != found.keys():
        return f"files differ: missing {sorted(expected.keys() - found.keys())}, extra {sorted(found.keys() - expected.keys())}"
    different = [name for name in expected if expected[name] != found[name]]
    return f"bytes differ: {different}" if different else ""


def _final_checkpoint(root: Path) -> Path:
    folders = list((root / "results" / DATASET).glob(f"{CONFIGURATION}__*/fold_0"))
    return (folders[0] if folders else root / "missing") / "checkpoint_final.pt"


def _compare_train(reference: Path, root: Path) -> str:
    import torch

    path = _final_checkpoint(root)
    if not path.is_file():
        return f"{path}: missing"
    expected = torch.load(_final_checkpoint(reference), map_location="cpu", weights_only=True)["network"]
    found = torch.load(path, map_location="cpu", weights_only=True)["network"]
    if expected.keys() != found.keys():
        return "network state keys differ"
    different = [k for k in expected if not torch.equal(expected[k], found[k])]
    return f"weights differ in {len(different)} tensors (first: {different[0]})" if different else ""


def _compare_predict(reference: Path, root: Path) -> str:
    import numpy as np

    from autoseg.io import read_segmentation

    expected = sorted(p.name for p in (reference / "prediction").iterdir() if not p.name.startswith("."))
    found = sorted(p.name for p in (root / "prediction").iterdir() if not p.name.startswith(".")) \
        if (root / "prediction").is_dir() else []
    if expected != found:
        return f"outputs differ: {expected} vs {found}"
    for name in expected:
        if not name.endswith(".nii.gz"):
            continue
        a, geometry_a = read_segmentation(reference / "prediction" / name)
        b, geometry_b = read_segmentation(root / "prediction" / name)
        if not np.array_equal(a, b) or geometry_a != geometry_b:
            return f"{name}: segmentation differs"
    return ""


COMPARE = {"plan": _compare_plan, "train": _compare_train, "predict": _compare_predict}


# ------------------------------------------------------------------------------------------ driver
def make_reference(work: Path, epochs: int, iters: int, num_cases: int, shape: Sequence[int]) -> dict[str, float]:
    """Generate the dataset and run the three stages uninterrupted in ``work/reference``; seconds per stage."""
    from autoseg.dataset.synthetic import SyntheticSpec, generate

    reference = work / "reference"
    generate(reference / "raw" / DATASET, SyntheticSpec(num_cases=num_cases, num_test=2, shape=tuple(shape),
                                                        spacing=(2.5, 0.8, 0.8), seed=18))
    seconds = {}
    for stage in STAGES:
        code, seconds[stage] = _run(stage_command(stage, reference, epochs, iters), work / f"reference_{stage}.log")
        if code != 0:
            raise RuntimeError(f"reference {stage} failed (exit {code}); see {work / f'reference_{stage}.log'}")
    return seconds


def run_trial(index: int, seed: int, work: Path, seconds: dict[str, float], epochs: int, iters: int) -> Trial:
    stage = STAGES[index % len(STAGES)]
    rng = random.Random(seed + index)
    # the last tenth of a run is mostly process exit; the first twentieth mostly imports
    delay = rng.uniform(0.05, 0.9) * seconds[stage]
    root = work / f"trial_{index:03d}_{stage}"
    shutil.rmtree(root, ignore_errors=True)
    _prepare_root(stage, work / "reference", root)
    log = root / "log.txt"
    interrupted, slow_to_die, orphans = _kill_at(stage_command(stage, root, epochs, iters), delay, log)
    found_work = interrupted and _finished_work(stage, root)
    code, _ = _run(stage_command(stage, root, epochs, iters, resume=True), log)
    time.sleep(ORPHAN_CHECK_S if interrupted else 0)
    leftovers = _processes_naming(root)
    detail = COMPARE[stage](work / "reference", root) if code == 0 else f"rerun failed with exit {code}"
    return Trial(index, stage, round(delay, 2), interrupted, found_work, identical=(code == 0 and not detail),
                 temp_files=_temp_files(root), orphans=orphans + len(leftovers), slow_to_die=slow_to_die,
                 rerun_returncode=code, detail=detail)


def _finished_work(stage: str, root: Path) -> bool:
    """Whether a killed run left work that the rerun keeps rather than redoes."""
    if stage == "plan":
        return any((root / "preprocessed" / DATASET / CONFIGURATION).glob("case_*.json"))
    if stage == "train":
        return _final_checkpoint(root).with_name("checkpoint_latest.pt").is_file()
    return any((root / "prediction").glob("*.nii.gz"))


def _processes_naming(root: Path) -> list[int]:
    """Live processes whose command line names the trial root: whatever outlived both runs."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(root).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def summarise(trials: list[Trial]) -> list[dict]:
    rows = []
    for stage in STAGES:
        mine = [t for t in trials if t.stage == stage]
        rows.append({
            "stage": stage,
            "trials": len(mine),
            "killed mid-run": sum(t.interrupted for t in mine),
            "rerun resumed from kept work": sum(t.found_work for t in mine),
            "identical": sum(t.identical for t in mine),
            "temp files left": sum(len(t.temp_files) for t in mine),
            f"processes alive {KILL_GRACE_S:g} s after the kill": sum(t.slow_to_die for t in mine),
            "orphan processes": sum(t.orphans for t in mine),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows]
    total = {h: (sum(row[h] for row in rows) if h != "stage" else "all") for h in header}
    lines.append("| " + " | ".join(f"**{total[h]}**" for h in header) + " |")
    return "\n".join(lines)


def run_benchmark(work: Path, trials: int, seed: int = 0, epochs: int = 4, iters: int = 3, num_cases: int = 6,
                  shape: Sequence[int] = (12, 32, 32)) -> tuple[list[Trial], dict[str, float]]:
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    seconds = make_reference(work, epochs, iters, num_cases, shape)
    results = []
    for index in range(trials):
        trial = run_trial(index, seed, work, seconds, epochs, iters)
        results.append(trial)
        print(f"trial {index:2d} {trial.stage:8s} kill at {trial.kill_after_s:6.2f}s "
              f"{'killed' if trial.interrupted else 'finished first'}{' (work kept)' if trial.found_work else ''}: "
              f"{'identical' if trial.identical else 'DIFFERENT ' + trial.detail}; temp files {len(trial.temp_files)}, "
              f"alive {KILL_GRACE_S:g} s after kill {trial.slow_to_die}, orphans {trial.orphans}", flush=True)
    (work / "faults.json").write_text(json.dumps({
        "reference_seconds": seconds, "trials": [asdict(t) for t in results]}, indent=2))
    return results, seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (emptied first)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3, help="training iterations per epoch")
    args = parser.parse_args(argv)
    results, seconds = run_benchmark(args.work, args.trials, args.seed, args.epochs, args.iters)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    print(f"\n{datetime.date.today()}, commit {commit}, {platform.machine()} {os.cpu_count()} cores; reference "
          + ", ".join(f"{s} {t:.1f} s" for s, t in seconds.items()) + f"; {args.trials} trials, seed {args.seed}\n")
    print(markdown(summarise(results)))
    different = [t for t in results if not t.identical]
    for trial in different:
        print(f"trial {trial.index} ({trial.stage}, kill at {trial.kill_after_s} s): {trial.detail}")
    return 0 if not different and not any(t.temp_files or t.orphans for t in results) else 1


if __name__ == "__main__":
    sys.exit(main())
