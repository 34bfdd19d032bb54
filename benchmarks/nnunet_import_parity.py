"""One-off parity check of ``autoseg import-nnunet``: nnU-Net v2's own predictor against autoseg's on an imported model.

Usage (from the repository root, autoseg's venv; nnU-Net v2 in its own venv, driven only through its commands)::

    python benchmarks/nnunet_import_parity.py --nnunet-venv ../wt-synth/.venv-nnunet [--workdir bench_out/nnunet_import]
                                              [--budget 240] [--cases 6] [--test-cases 3]

Steps, each skipped when its output is already in ``--workdir`` (so a rerun after a failure resumes):

1. a synthetic 3D dataset (``autoseg.dataset.synthetic``: ``--cases`` training + ``--test-cases`` test cases,
   about 32 x 48 x 48 voxels, MRI: z-score normalisation) as ``Dataset981_ImportParity``;
2. nnU-Net: ``nnUNetv2_plan_and_preprocess --no_pp``, ``nnUNetv2_preprocess -c 3d_fullres``, then its default
   ``nnUNetTrainer`` on fold 0 for ``--budget`` seconds (benchmarks/nnunet_budget_driver.py: nnU-Net's own
   training loop, fewer iterations per epoch), then ``nnUNetv2_predict`` on imagesTs (mirroring, step 0.5: its
   defaults);
3. autoseg: ``autoseg import-nnunet <results folder> -o model.zip -f 0``, then ``autoseg predict -m model.zip``
   on the same imagesTs (mirroring, step 0.5: our defaults too);
4. Dice per foreground class between the two predictions of every test case, and both predict wall times.

The accuracy of the model does not matter here (a few minutes of CPU training): the two predictions of the same
weights must agree. Prints a markdown table (docs/prediction.md, "Models trained with nnU-Net v2").
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np

from common import machine_description, markdown_table, run_measured
from nnunet_side import NnUNet, nnunet_fold_dir

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset981_ImportParity"
CONFIGURATION = "3d_fullres"


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    """Dice of ``label`` between two label maps; 1.0 when neither holds it."""
    x, y = a == label, b == label
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * int((x & y).sum()) / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nnunet-venv", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench_out" / "nnunet_import")
    parser.add_argument("--budget", type=float, default=240.0, help="nnU-Net training seconds")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--test-cases", type=int, default=3)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from autoseg.dataset.synthetic import SyntheticSpec, generate
    from autoseg.io import read_segmentation

    workdir = args.workdir.resolve()
    raw = workdir / "raw" / DATASET
    if not (raw / "dataset.json").is_file():
        generate(raw, SyntheticSpec(num_cases=args.cases, num_test=args.test_cases, shape=(32, 48, 48),
                                    spacing=(1.5, 1.0, 1.0), seed=3))
    nnunet = NnUNet(args.nnunet_venv, workdir / "nnunet", num_processes=2,
                    extra_env={"nnUNet_n_proc_DA": "2", "nnUNet_def_n_proc": "1"})
    nnunet.link_raw(raw)
    fold_dir = nnunet_fold_dir(nnunet.workdir, DATASET, CONFIGURATION, 0)
    if not (fold_dir / "checkpoint_final.pth").is_file():
        nnunet.fingerprint_and_plan(981)
        nnunet.preprocess(981, CONFIGURATION)
        training = nnunet.train_budget(981, CONFIGURATION, 0, budget_seconds=args.budget, overwrite=True)
        print(f"nnU-Net training: {training.measurement.wall_s:.0f} s", flush=True)
    images = raw / "imagesTs"
    nnunet_out = workdir / "pred_nnunet"
    if not nnunet_out.is_dir() or not list(nnunet_out.glob("*.nii.gz")):
        nnunet_time = nnunet.predict(images, nnunet_out, 981, CONFIGURATION, 0).wall_s
        (workdir / "nnunet_predict_seconds.txt").write_text(f"{nnunet_time:.2f}\n")
    nnunet_time = float((workdir / "nnunet_predict_seconds.txt").read_text())

    autoseg = [sys.executable, "-m", "autoseg"]
    bundle = workdir / "model.zip"
    start = time.perf_counter()
    run_measured([*autoseg, "import-nnunet", str(fold_dir.parent), "-o", str(bundle), "-f", "0"],
                 log_path=workdir / "import.log", cwd=REPO)
    import_time = time.perf_counter() - start
    ours_out = workdir / "pred_autoseg"
    ours_time = run_measured([*autoseg, "predict", "-m", str(bundle), "-i", str(images), "-o", str(ours_out),
                              "--device", "cpu", "-np", "1"], log_path=workdir / "predict_autoseg.log", cwd=REPO).wall_s

    rows = []
    labels = (1, 2)
    for reference in sorted(nnunet_out.glob("*.nii.gz")):
        theirs, _ = read_segmentation(reference)
        ours, _ = read_segmentation(ours_out / reference.name)
        differing = int((np.asarray(theirs) != np.asarray(ours)).sum())
        # voxel counts beside the Dice: a class that neither predicts has Dice 1.0 and proves nothing
        rows.append([reference.name.replace(".nii.gz", ""),
                     *(f"{dice(theirs, ours, k):.4f} ({int((theirs == k).sum())} / {int((ours == k).sum())})"
                       for k in labels),
                     f"{differing} / {theirs.size}"])
    machine = machine_description()
    print(f"{dt.date.today().isoformat()}, {machine['cpu']}, {machine['cores']} cores, CPU only; "
          f"nnU-Net {nnunet.version()}")
    print(markdown_table(["case", "class 1: Dice (voxels nnU-Net / autoseg)", "class 2: Dice (voxels nnU-Net / autoseg)",
                          "voxels that differ"], rows))
    print(f"\npredict wall time for {len(rows)} cases: nnUNetv2_predict {nnunet_time:.1f} s, "
          f"autoseg predict {ours_time:.1f} s (import: {import_time:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
