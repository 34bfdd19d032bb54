"""Planning benchmark: wall time and peak RSS of fingerprint + plan, median of 3 runs, as a table.

Ours: `autoseg plan D --no-preprocess --skip-verify -np 2` (whole command, import included), once planning
only the plain U-Net (`--arch unet`, what nnU-Net plans) and once every registered architecture.
nnU-Net (with --nnunet-venv, see ../shared/bench/README.md): `nnUNetv2_extract_fingerprint -d ID -np 2`
then `nnUNetv2_plan_experiment -d ID`, alternated with ours (A B A B ...) in the same invocation.

The dataset is regenerated from an oracle recipe (../shared/reference/oracle/<name>/recipe.txt).

    python benchmarks/bench_planning.py --work /tmp/bench_plan
    python benchmarks/bench_planning.py --work /tmp/bench_plan --nnunet-venv /path/to/nnunet_venv

Peak RSS is the largest sum of resident memory over the command and all its descendants, sampled from
/proc every 20 ms. Linux only.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from common import run_measured  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ORACLE = SHARED / "reference" / "oracle"


def run_commands_measured(commands: list[list[str]], env: dict[str, str]) -> tuple[float, int]:
    """Run ``commands`` one after another; (wall seconds, peak RSS bytes over the whole process tree),
    measured by the shared poller in common.py."""
    wall, peak = 0.0, 0.0
    for command in commands:
        measured = run_measured(command, env=env, poll_interval_s=0.02)
        wall += measured.wall_s
        peak = max(peak, measured.peak_rss_mb)
    return wall, int(peak * 2**20)


def regenerate(name: str, raw_root: Path) -> Path:
    words = shlex.split((ORACLE / name / "recipe.txt").read_text().strip())
    args = [a.replace("OUT", str(raw_root)) if a.startswith("OUT") else a for a in words[2:]]
    target = raw_root / name
    if not target.is_dir():
        subprocess.run([sys.executable, str(SHARED / "bench" / "make_synthetic.py"), *args], check=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder")
    parser.add_argument("--dataset", default="Dataset970_SynthMR", help="oracle dataset to regenerate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nnunet-venv", type=Path, default=None, help="venv with nnunetv2 installed")
    args = parser.parse_args()

    root = args.work / "autoseg"
    raw = regenerate(args.dataset, root / "raw")
    number = args.dataset[7:10]
    env = dict(os.environ)
    autoseg = [sys.executable, "-m", "autoseg", "plan", args.dataset, "--root", str(root), "--no-preprocess",
               "--skip-verify", "-np", "2"]
    tools: dict[str, list[list[str]]] = {
        "autoseg plan --arch unet": [autoseg + ["--arch", "unet"]],
        "autoseg plan (all archs)": [autoseg],
    }
    nnunet_env = dict(env)
    if args.nnunet_venv is not None:
        # the nnU-Net side plugs in here: its raw folder holds a link to the same raw dataset
        nn_root = args.work / "nnunet"
        for sub in ("raw", "preprocessed", "results"):
            (nn_root / sub).mkdir(parents=True, exist_ok=True)
        link = nn_root / "raw" / args.dataset
        if not link.exists():
            link.symlink_to(raw.resolve())
        nnunet_env.update(nnUNet_raw=str(nn_root / "raw"), nnUNet_preprocessed=str(nn_root / "preprocessed"),
                          nnUNet_results=str(nn_root / "results"))
        bin_dir = args.nnunet_venv / "bin"
        tools["nnUNetv2 fingerprint + plan"] = [
            [str(bin_dir / "nnUNetv2_extract_fingerprint"), "-d", number, "-np", "2", "--clean"],
            [str(bin_dir / "nnUNetv2_plan_experiment"), "-d", number],
        ]

    results: dict[str, list[tuple[float, int]]] = {name: [] for name in tools}
    for _ in range(args.repeats):  # alternate the tools so machine noise hits them alike
        for name, commands in tools.items():
            if name.startswith("autoseg"):
                shutil.rmtree(root / "preprocessed", ignore_errors=True)
            results[name].append(run_commands_measured(commands, nnunet_env if name.startswith("nnUNet") else env))

    reference = "nnUNetv2 fingerprint + plan" if "nnUNetv2 fingerprint + plan" in results else None
    lines = [f"planning benchmark: {args.dataset}, median of {args.repeats}, {os.cpu_count()} CPUs",
             f"{'tool':<30} {'wall (s)':>9} {'peak RSS (MB)':>14} {'time ratio':>11}"]
    ref_time = statistics.median(t for t, _ in results[reference]) if reference else None
    for name, runs in results.items():
        wall = statistics.median(t for t, _ in runs)
        peak = statistics.median(p for _, p in runs) / 1e6
        ratio = f"{wall / ref_time:.2f}" if ref_time else "-"
        lines.append(f"{name:<30} {wall:>9.2f} {peak:>14.0f} {ratio:>11}")
    table = "\n".join(lines)
    print(table)
    (args.work / "bench_planning.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
