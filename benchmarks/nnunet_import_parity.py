"""One-off parity check of ``autoseg import-nnunet``: nnU-Net v2's own predictor against autoseg's on an imported model.

Usage (from the repository root, autoseg's venv; nnU-Net v2 in its own venv, driven only through its commands)::

    python benchmarks/nnunet_import_parity.py --nnunet-venv ../wt-synth/.venv-nnunet [--workdir bench_out/nnunet_import]
                                              [--budget 240] [--cases 6] [--test-cases 3]

Steps, each skipped when its output is already in ``--workdir`` (so a rerun after a failure resumes; it then
reports nnU-Net's predict time recorded by the first run, measured under that run's machine load):

1. a synthetic 3D dataset (``autoseg.dataset.synthetic``: ``--cases`` training + ``--test-cases`` test cases,
   about 32 x 48 x 48 voxels, MRI: z-score normalisation) as ``Dataset981_ImportParity``;
2. nnU-Net: ``nnUNetv2_plan_and_preprocess --no_pp``, ``nnUNetv2_preprocess -c 3d_fullres``, then its default
   ``nnUNetTrainer`` on fold 0 for ``--budget`` seconds (benchmarks/nnunet_budget_driver.py: nnU-Net's own
   training loop, fewer iterations per epoch), then ``nnUNetv2_predict`` on imagesTs (mirroring, step 0.5: its
   defaults);
3. autoseg: ``autoseg import-nnunet <results folder> -o model.zip -f 0``, then ``autoseg predict -m model.zip``
   on the same imagesTs (mirroring, step 0.5: our defaults too);
4. Dice per foreground class between the two predictions of every test case, and both predict wall times;
5. network level, no training: nnU-Net's own PlainConvUNet and ResidualEncoderUNet (3 stages, 2D and 3D, random
   weights with perturbed norms), built and run in its venv; their state dicts translated by
   ``translate_state_dict`` into ours, run on the same input: the largest absolute logit difference.

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


# run with nnU-Net's python: its networks (dynamic_network_architectures) with random weights, their state dicts,
# an input and their logits, saved with torch.save for network_parity() to read
NNUNET_NETWORKS = """
import sys, torch
from torch import nn
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
torch.manual_seed(0)
for dims in (2, 3):
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dims == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3]] if dims == 3 else [[3, 3]] * 3
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]] if dims == 3 else [[1, 1], [2, 2], [2, 2]]
    common = dict(input_channels=2, n_stages=3, features_per_stage=[4, 8, 16], conv_op=conv, kernel_sizes=kernels,
                  strides=strides, num_classes=3, conv_bias=True, norm_op=norm,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=False)
    for name, network in (("unet", PlainConvUNet(n_conv_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2], **common)),
                          ("resenc", ResidualEncoderUNet(n_blocks_per_stage=[1, 3, 2], n_conv_per_stage_decoder=[1, 1],
                                                         **common))):
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.1)
        network.eval()
        x = torch.randn(1, 2, *([8, 16, 16] if dims == 3 else [16, 16]))
        with torch.no_grad():
            y = network(x)
        torch.save({"weights": network.state_dict(), "x": x, "y": y, "kernels": kernels, "strides": strides},
                   f"{sys.argv[1]}/{name}_{dims}d.pt")
"""


def network_parity(nnunet_python: Path, workdir: Path) -> list[list[str]]:
    """Rows (architecture, dims, nnU-Net keys, our keys, max |logit difference|) of step 5."""
    import subprocess

    import torch

    from autoseg import networks
    from autoseg.inference.nnunet_import import translate_state_dict

    folder = workdir / "networks"
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(nnunet_python), "-c", NNUNET_NETWORKS, str(folder)], check=True)
    rows = []
    for dims in (2, 3):
        for name in ("unet", "resenc"):
            saved = torch.load(folder / f"{name}_{dims}d.pt", weights_only=True)
            options = {"blocks_per_stage": [1, 3, 2]} if name == "resenc" else {}
            network = networks.build(networks.NetworkSpec(
                name, 2, 3, patch_size=list(saved["x"].shape[2:]), strides=saved["strides"],
                kernel_sizes=saved["kernels"], features=[4, 8, 16], deep_supervision=False, options=options,
            ))
            state = translate_state_dict(saved["weights"], name, network.state_dict(), name)
            network.load_state_dict(state, strict=True)
            with torch.no_grad():
                difference = (network.eval()(saved["x"]) - saved["y"]).abs().max().item()
            rows.append([name, f"{dims}D", str(len(saved["weights"])), str(len(state)), f"{difference:.2e}"])
    return rows


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
    print()
    print(markdown_table(["architecture", "dims", "nnU-Net keys", "our keys", "max |logit difference|"],
                         network_parity(nnunet.python, workdir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
