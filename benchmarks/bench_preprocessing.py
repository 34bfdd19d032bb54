"""Preprocessing benchmark: throughput (cases/s) and peak RSS of `autoseg preprocess` for 3d_fullres with
2 workers, median of 3 runs, optionally against `nnUNetv2_preprocess` on the same dataset and plan in the
same invocation (alternating A B A B), plus the equivalence of the two outputs (Pearson r of the images,
Dice per class of the labels).

The dataset is regenerated from the oracle recipe (../shared/reference/oracle/Dataset970_SynthMR/recipe.txt)
and both tools use nnU-Net's own oracle plan for it: our Plans are built from its 3d_fullres target spacing,
normalisation and resampling orders, so only the implementations differ.

    python benchmarks/bench_preprocessing.py --work /tmp/bench_pre
    python benchmarks/bench_preprocessing.py --work /tmp/bench_pre --nnunet-venv /path/to/nnunet_venv

Peak RSS is the largest sum of resident memory over the benchmarked process and all its descendants
(sampled from /proc every 20 ms), so worker pools are counted in full. Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import run_measured  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ORACLE = SHARED / "reference" / "oracle" / "Dataset970_SynthMR"
DATASET = "Dataset970_SynthMR"
NNUNET_NORMALIZATION = {
    "ZScoreNormalization": "zscore",
    "CTNormalization": "ct",
    "NoNormalization": "none",
    "RescaleTo01Normalization": "rescale_0_1",
    "RGBTo0_1Normalization": "rgb_0_1",
}


# ------------------------------------------------------------------------------------------- measuring
def measured_run(command: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run ``command``; (wall seconds, peak summed RSS in bytes of it and its descendants), measured by the
    shared poller in common.py."""
    measured = run_measured(command, env=env, poll_interval_s=0.02)
    return measured.wall_s, int(measured.peak_rss_mb * 2**20)


# ----------------------------------------------------------------------------------------------- setup
def make_dataset(work: Path) -> Path:
    """Regenerate Dataset970 from the oracle recipe into work/raw (skipped when already there)."""
    raw = work / "raw" / DATASET
    if not (raw / "dataset.json").is_file():
        recipe = (ORACLE / "recipe.txt").read_text().split()
        # recipe: python ../shared/bench/make_synthetic.py OUT/<name> <args...>
        args = recipe[3:]
        subprocess.run([sys.executable, str(SHARED / "bench" / "make_synthetic.py"), str(raw), *args], check=True)
    return raw


def write_our_plans(work: Path, raw: Path) -> None:
    """Our plans.json from nnU-Net's oracle plan, so both tools resample to the same grid."""
    from autoseg.contracts.plans import ArchitectureSpec, Configuration, IntensityStats, Plans, Resampling, save_plans

    oracle = json.loads((ORACLE / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((raw / "dataset.json").read_text())
    c = oracle["configurations"]["3d_fullres"]
    arch = c["architecture"]["arch_kwargs"]
    configuration = Configuration(
        name="3d_fullres",
        data_identifier="3d_fullres",
        dims=3,
        target_spacing=list(c["spacing"]),
        patch_size=list(c["patch_size"]),
        batch_size=c["batch_size"],
        median_shape=list(c["median_image_size_in_voxels"]),
        normalization=[NNUNET_NORMALIZATION[n] for n in c["normalization_schemes"]],
        use_mask_for_norm=list(c["use_mask_for_norm"]),
        resampling=Resampling(
            order_image=c["resampling_fn_data_kwargs"]["order"],
            order_label=c["resampling_fn_seg_kwargs"]["order"],
            order_probabilities=c["resampling_fn_probabilities_kwargs"]["order"],
            order_z=c["resampling_fn_data_kwargs"]["order_z"],
            separate_z=c["resampling_fn_data_kwargs"]["force_separate_z"],
        ),
        architecture=ArchitectureSpec(
            name="unet",
            patch_size=list(c["patch_size"]),
            strides=arch["strides"],
            kernel_sizes=arch["kernel_sizes"],
            features=arch["features_per_stage"],
        ),
    )
    plans = Plans(
        dataset_name=DATASET,
        channel_names=dict(dataset_json["channel_names"]),
        labels=dict(dataset_json["labels"]),
        file_ending=dataset_json["file_ending"],
        configurations={"3d_fullres": configuration},
        default_configurations=["3d_fullres"],
        intensity_stats={k: IntensityStats(**v) for k, v in oracle["foreground_intensity_properties_per_channel"].items()},
        median_spacing=list(oracle["original_median_spacing_after_transp"]),
        median_shape=list(oracle["original_median_shape_after_transp"]),
    )
    save_plans(plans, work / "preprocessed" / DATASET / "plans.json")


def ours_command(work: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "autoseg", "preprocess", DATASET, "-c", "3d_fullres", "-np", str(workers),
            "--root", str(work)]


def nnunet_setup(work: Path, raw: Path) -> dict[str, str]:
    """nnU-Net's three folders under work/nnunet, the raw dataset linked in, the oracle plan copied."""
    base = work / "nnunet"
    env = dict(os.environ)
    for name in ("raw", "preprocessed", "results"):
        (base / name).mkdir(parents=True, exist_ok=True)
        env[f"nnUNet_{name}"] = str(base / name)
    link = base / "raw" / DATASET
    if not link.exists():
        link.symlink_to(raw, target_is_directory=True)
    target = base / "preprocessed" / DATASET
    target.mkdir(exist_ok=True)
    shutil.copy(ORACLE / "nnUNetPlans.json", target / "nnUNetPlans.json")
    shutil.copy(ORACLE / "dataset_fingerprint.json", target / "dataset_fingerprint.json")
    shutil.copy(raw / "dataset.json", target / "dataset.json")
    return env


def nnunet_command(venv: Path, workers: int) -> list[str]:
    return [str(venv / "bin" / "nnUNetv2_preprocess"), "-d", DATASET.split("_")[0][len("Dataset"):],
            "-c", "3d_fullres", "-np", str(workers)]


# --------------------------------------------------------------------------------------------- compare
_EXPORT = """
import sys, pathlib, numpy as np, blosc2
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]); dst.mkdir(parents=True, exist_ok=True)
for f in sorted(src.glob('*.b2nd')):
    np.save(dst / (f.name[:-5] + '.npy'), blosc2.open(urlpath=str(f), mode='r')[:])
for f in sorted(src.glob('*.npz')):
    d = np.load(f); np.save(dst / (f.stem + '.npy'), d['data']);
    if 'seg' in d: np.save(dst / (f.stem + '_seg.npy'), d['seg'])
"""


def compare_outputs(work: Path, venv: Path) -> list[dict]:
    """Pearson r (images) and Dice per class (labels) of our 3d_fullres folder against nnU-Net's."""
    from autoseg.preprocessing.store import load_case

    theirs_raw = work / "nnunet" / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres"
    theirs = work / "nnunet_npy"
    subprocess.run([str(venv / "bin" / "python"), "-c", _EXPORT, str(theirs_raw), str(theirs)], check=True)
    ours = work / "preprocessed" / DATASET / "3d_fullres"
    rows = []
    for ours_file in sorted(ours.glob("*.json")):
        case = ours_file.stem
        a, sa, _ = load_case(ours, case, mmap=False)  # our store's arrays, .b2nd or .npy
        b = np.load(theirs / f"{case}.npy")
        row = {"case": case, "shape_ours": list(a.shape), "shape_nnunet": list(b.shape)}
        if a.shape == b.shape:
            row["pearson_r"] = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
            sb = np.load(theirs / f"{case}_seg.npy")
            sb = np.where(sb < 0, 0, sb)  # nnU-Net marks background outside the nonzero mask as -1
            for value in sorted(set(np.unique(sa).tolist()) - {0}):
                x, y = sa == value, sb == value
                row[f"dice_{value}"] = float(2 * (x & y).sum() / max(x.sum() + y.sum(), 1))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a new temp folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--nnunet-venv", type=Path, default=None, help="venv with nnunetv2 installed")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    work = (args.work or Path(tempfile.mkdtemp(prefix="bench_pre_"))).resolve()
    raw = make_dataset(work)
    write_our_plans(work, raw)
    num_cases = len(list((raw / "labelsTr").glob("*.nii.gz")))
    env = nnunet_setup(work, raw) if args.nnunet_venv else None

    tools = {"autoseg": ([], [])}
    if args.nnunet_venv:
        tools["nnU-Net v2"] = ([], [])
    for repeat in range(args.repeats):
        for tool, (walls, peaks) in tools.items():  # alternating A B A B: both see the same machine load
            if tool == "autoseg":
                shutil.rmtree(work / "preprocessed" / DATASET / "3d_fullres", ignore_errors=True)
                wall, peak = measured_run(ours_command(work, args.workers))
            else:
                shutil.rmtree(work / "nnunet" / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres", ignore_errors=True)
                wall, peak = measured_run(nnunet_command(args.nnunet_venv, args.workers), env=env)
            walls.append(wall)
            peaks.append(peak)
            print(f"run {repeat + 1}/{args.repeats} {tool}: {wall:.2f} s, peak RSS {peak / 2**20:.0f} MiB", flush=True)

    results = {"dataset": DATASET, "cases": num_cases, "workers": args.workers, "repeats": args.repeats, "tools": {}}
    print(f"\n{DATASET}, {num_cases} cases, 3d_fullres, {args.workers} workers, median of {args.repeats}")
    print(f"{'tool':<12} {'wall s':>8} {'cases/s':>8} {'peak RSS MiB':>13}")
    for tool, (walls, peaks) in tools.items():
        wall, peak = statistics.median(walls), statistics.median(peaks)
        results["tools"][tool] = {"wall_s": wall, "cases_per_s": num_cases / wall, "peak_rss_mib": peak / 2**20,
                                  "walls": walls, "peaks_mib": [p / 2**20 for p in peaks]}
        print(f"{tool:<12} {wall:>8.2f} {num_cases / wall:>8.2f} {peak / 2**20:>13.0f}")
    if args.nnunet_venv:
        ours, theirs = results["tools"]["autoseg"], results["tools"]["nnU-Net v2"]
        print(f"throughput ratio autoseg/nnU-Net: {ours['cases_per_s'] / theirs['cases_per_s']:.2f}x, "
              f"peak RSS ratio: {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}")
        rows = compare_outputs(work, args.nnunet_venv)
        results["equivalence"] = rows
        matched = [r for r in rows if "pearson_r" in r]
        print(f"equivalence: {len(matched)}/{len(rows)} cases with equal shapes")
        if matched:
            print(f"  Pearson r min {min(r['pearson_r'] for r in matched):.4f}, "
                  f"median {statistics.median(r['pearson_r'] for r in matched):.4f}")
            for key in sorted({k for r in matched for k in r if k.startswith('dice_')}):
                values = [r[key] for r in matched if key in r]
                print(f"  {key}: min {min(values):.4f}, median {statistics.median(values):.4f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
