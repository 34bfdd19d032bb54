"""`autoseg` command line: argparse sub-commands mapped onto stage functions.

This is the one place that catches :class:`AutosegError`: the message is printed as one line and the exit
code is non-zero; ``--debug`` shows the traceback. Stage packages are imported inside each handler so that
``autoseg --help`` answers instantly.

Each stage owns its handler below (``_cmd_<stage>``) and nothing else in this file.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from autoseg import __version__
from autoseg.errors import AutosegError

log = logging.getLogger("autoseg")

EPILOG = (
    "Typical use: autoseg verify 4 -> autoseg plan 4 -> autoseg train 4 3d_fullres 0 (folds 0-4) -> "
    "autoseg find-best 4 -> autoseg predict -i IN -o OUT -d 4 -c 3d_fullres. "
    "All data lives under --root (default $AUTOSEG_HOME or ./autoseg_data). Docs: docs/quickstart.md"
)


def _add_common(parser: argparse.ArgumentParser, on_subcommand: bool = False) -> None:
    """--root/--debug/-v, accepted before the command (``autoseg --debug verify 4``) and after it. On
    sub-commands the defaults are suppressed so an option given before the command is not reset."""
    default = (lambda value: argparse.SUPPRESS) if on_subcommand else (lambda value: value)
    parser.add_argument("--root", default=default(None), help="data root holding raw/, preprocessed/, results/ "
                        "(default: $AUTOSEG_HOME, else ./autoseg_data)")
    parser.add_argument("--debug", action="store_true", default=default(False),
                        help="show the full traceback on errors")
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False), help="more log output")


# --------------------------------------------------------------------------------------------- handlers
def _cmd_verify(args: argparse.Namespace) -> int:
    from autoseg.dataset.verify import verify_dataset
    from autoseg.paths import resolve_dataset

    location = resolve_dataset(args.dataset, args.root)
    report = verify_dataset(location.raw, num_workers=args.num_workers)
    print(report.format())
    return 0 if report.ok else 1


def _cmd_convert_msd(args: argparse.Namespace) -> int:
    from autoseg.dataset.msd import convert_msd

    out = convert_msd(args.task_dir, root=args.root, number=args.number, name=args.name, overwrite=args.overwrite,
                      num_workers=args.num_workers, regions=args.regions)
    print(f"converted {args.task_dir} -> {out}")
    print(f"next: autoseg verify {out.name} --root {args.root}" if args.root else f"next: autoseg verify {out.name}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from autoseg.pipeline import plan_dataset

    plan_dataset(
        args.dataset,
        root=args.root,
        gpu_memory_gb=args.gpu_memory,
        configurations=args.configs,
        architectures=args.arch,
        patch_size=args.patch_size,
        num_workers=args.num_workers,
        preprocess=not args.no_preprocess,
        skip_verify=args.skip_verify,
        preset=args.preset,
        force=args.force,
    )
    name = args.dataset
    root = f" --root {args.root}" if args.root else ""
    step = "" if not args.no_preprocess else f"autoseg preprocess {name}{root}, then "
    print(f"next: {step}autoseg train {name} CONFIGURATION FOLD{root} for folds 0-4 (see the table above)")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from autoseg.preprocessing import preprocess_dataset

    report = preprocess_dataset(args.dataset, configurations=args.configs, root=args.root, num_workers=args.num_workers,
                                force=args.force)
    print(report.format())
    if not report.ok:
        print("fix or remove the failed case(s), then rerun the same command: complete cases are skipped")
    return 0 if report.ok else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from autoseg.training import train

    train(
        args.dataset,
        args.configuration,
        args.fold,
        root=args.root,
        architecture=args.arch,
        epochs=args.epochs,
        iterations_per_epoch=args.iters_per_epoch,
        continue_training=args.continue_training,
        device=args.device,
        compile_network=args.compile,
        selfreg=args.selfreg,
        pretrained=args.pretrained,
        seed=args.seed,
        time_budget=args.time_budget,
        num_workers=args.num_workers,
        validate=not args.no_validation,
        force=args.force,
        loss=args.loss,
        lr_schedule=args.lr_schedule,
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from autoseg.inference import predict

    if args.model is not None and (args.dataset is not None or args.configuration is not None or args.arch):
        from autoseg.errors import ConfigurationError

        raise ConfigurationError(f"{args.model}: -m takes the model from the bundle; leave out -d/-c/--arch")
    if args.model is None and (args.dataset is None or args.configuration is None):
        from autoseg.errors import ConfigurationError

        raise ConfigurationError("which model? pass -d DATASET -c CONFIGURATION (trained under the data root) or "
                                 "-m model.zip (a bundle from `autoseg export`)")
    report = predict(
        args.input,
        args.output,
        dataset=args.dataset,
        configuration=args.configuration,
        folds=args.folds,
        root=args.root,
        architecture=args.arch,
        step_size=args.step,
        mirror=not args.no_mirror,
        save_probabilities=args.save_probabilities,
        device=args.device,
        num_workers=args.num_workers,
        checkpoint=args.checkpoint,
        postprocess=not args.no_postprocessing,
        mixed_precision=not args.fp32,
        part=args.part,
        parts=args.parts,
        output_format=args.output_format,
        bundle=args.model,
    )
    print(report.format())
    return 0 if report.ok else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from autoseg.inference.export import export_model

    written = export_model(args.dataset, args.configuration, args.output, format=args.format, folds=args.folds,
                           root=args.root, architecture=args.arch, checkpoint=args.checkpoint)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")
    if args.format == "bundle":
        print(f"on any machine: autoseg predict -m {written[0]} -i IMAGES -o OUTPUT")
    return 0


def _cmd_import_nnunet(args: argparse.Namespace) -> int:
    from autoseg.inference.nnunet_import import import_nnunet

    written = import_nnunet(args.results_folder, args.output, folds=args.folds, checkpoint=args.checkpoint)
    print(f"wrote {written} ({written.stat().st_size / 2**20:.1f} MB)")
    print(f"on any machine: autoseg predict -m {written} -i IMAGES -o OUTPUT")
    return 0


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from autoseg.inference.ensemble import ensemble_folders

    rules = None
    if args.postprocessing:
        from autoseg.contracts.postprocessing import load_postprocessing

        rules = load_postprocessing(args.postprocessing)
        if rules is None:
            from autoseg.errors import ConfigurationError

            raise ConfigurationError(
                f"{args.postprocessing}: no postprocessing.json there; pass the file find-best printed"
            )
    written = ensemble_folders(args.inputs, args.output, save_probabilities=args.save_probabilities, postprocessing=rules)
    print(f"ensembled {len(written)} case(s) of {len(args.inputs)} folders into {args.output}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from autoseg.evaluation import evaluate_folders, format_table

    summary = evaluate_folders(
        args.prediction, args.reference, labels=args.labels, tolerance_mm=args.tolerance, num_workers=args.num_workers
    )
    print(format_table(summary))
    print(f"summary written to {summary.prediction_dir}/summary.json")
    return 0 if summary.ok else 1


def _cmd_find_best(args: argparse.Namespace) -> int:
    from autoseg.evaluation import find_best

    find_best(args.dataset, root=args.root, configurations=args.configs, folds=args.folds, num_workers=args.num_workers)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from autoseg.demo import run_demo

    result = run_demo(root=args.root, quick=args.quick, device=args.device, keep=args.keep)
    return 0 if result.ok else 1


def _cmd_info(args: argparse.Namespace) -> int:
    from autoseg.info import print_info

    print_info(root=args.root)
    return 0


# ---------------------------------------------------------------------------------------------- parser
DATASET_HELP = "dataset folder name, number (4, 004), name (Hippocampus) or path"
DEVICE_HELP = "auto (CUDA, else Apple MPS, else CPU), cuda, cuda:N, cpu or mps"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where X tells the reader something: not for unset options (None), not for
    flags (False), not where the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoseg",
        description="Self-configuring medical image segmentation: plan, preprocess, train, predict, evaluate.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"autoseg {__version__}")
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = HelpFormatter

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str, description: str):
        p = sub.add_parser(name, help=help_text, description=description, formatter_class=fmt)
        _add_common(p, on_subcommand=True)
        p.set_defaults(handler=handler)
        return p

    p = command("verify", _cmd_verify, "check a raw dataset and report every problem",
                "Check every case of a raw dataset (files, geometry, labels, dataset.json) and report ALL problems "
                "at once, each with the file, what was expected, what was found and the fix. Exit 0 when clean. "
                "Never modifies the dataset.")
    p.add_argument("dataset", help=DATASET_HELP)
    p.add_argument("-np", "--num-workers", type=int, default=2, help="parallel reader processes")

    p = command("convert-msd", _cmd_convert_msd, "convert a Medical Segmentation Decathlon task",
                "Convert an MSD task folder (4D NIfTI images, MSD dataset.json) into autoseg's raw layout under "
                "<root>/raw/DatasetXXX_Name, one file per channel with its geometry.")
    p.add_argument("task_dir", help="e.g. Task04_Hippocampus")
    p.add_argument("--number", type=int, default=None, help="dataset number (default: the task number)")
    p.add_argument("--name", default=None, help="dataset name (default: the task name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing converted dataset")
    p.add_argument("--regions", action="store_true",
                   help="BraTS-like tasks (4 channels, labels 0-3): declare the nested regions whole tumour "
                        "[1,2,3], tumour core [2,3], enhancing tumour [3] (docs/datasets.md)")
    p.add_argument("-np", "--num-workers", type=int, default=2, help="parallel conversion processes")

    p = command("plan", _cmd_plan, "fingerprint a dataset and write plans.json (then preprocess)",
                "Fingerprint the dataset (spacings, shapes, intensities), decide configurations, patch and batch "
                "sizes, topology and normalisation (plans.json), write the 5-fold splits.json, then preprocess "
                "every default configuration. See docs/planning.md for each rule and how to override it.")
    p.add_argument("dataset", help=DATASET_HELP)
    p.add_argument("--gpu-memory", type=float, default=None,
                   help="GPU memory in GB to size patch and batch for (default: the memory of CUDA GPU 0, or 8 "
                   "without CUDA; the plan prints which)")
    p.add_argument("--configs", nargs="+", default=None, help="only these base configurations (2d 3d_fullres 3d_lowres 3d_cascade_fullres; the "
                   "last two are planned only for images much larger than the patch)")
    p.add_argument("--arch", nargs="+", default=None, help="architectures to plan (default: every one that applies)")
    # names, not choices=: the presets table lives in autoseg.planning, whose import (1.2 s) --help should not pay;
    # an unknown name fails in planning.presets.get_preset with the list
    p.add_argument("--preset", default=None, metavar="{resenc-m,resenc-l,resenc-xl}",
                   help="nnU-Net's residual-encoder presets: plan the resenc configurations (the defaults; --arch adds "
                   "others) for 8 / 24 / 40 GB without the 5 %% batch cap; --gpu-memory, when given, wins over the "
                   "preset's size (docs/planning.md, Presets)")
    p.add_argument("--patch-size", type=int, nargs="+", default=None, help="force this patch size (array order)")
    p.add_argument("--no-preprocess", action="store_true", help="write plans only")
    p.add_argument("--skip-verify", action="store_true", help="plan even if `autoseg verify` finds problems")
    p.add_argument("--force", action="store_true", help="preprocess every case again (default: only cases whose "
                   "raw files or plan entries changed since they were stored)")
    p.add_argument("-np", "--num-workers", type=int, default=2, help="parallel worker processes")

    p = command("preprocess", _cmd_preprocess, "crop, resample, normalise and store training cases",
                "Preprocess every training case for the given configurations (default: all planned). Reruns skip "
                "complete cases and redo partial ones; a failing case is reported and the others still finish.")
    p.add_argument("dataset", help=DATASET_HELP)
    p.add_argument("-c", "--configs", nargs="+", default=None, help="configurations (default: all in plans.json)")
    p.add_argument("-np", "--num-workers", type=int, default=None,
                   help="parallel worker processes (default: one per core up to 8, fewer when free RAM is short)")
    p.add_argument("--force", action="store_true", help="redo every case (default: only incomplete cases and those "
                   "whose raw files or plan entries changed since they were stored)")

    p = command("train", _cmd_train, "train one fold of one configuration",
                "Train CONFIGURATION on fold FOLD (0-4, or 'all' for all training data). Writes checkpoints, "
                "log.txt and progress.png to results/<dataset>/<config>__<arch>/fold_<k>/ and, at the end, "
                "predicts the fold's validation cases. Use torchrun for several GPUs (docs/cluster.md).")
    p.add_argument("dataset", help=DATASET_HELP)
    p.add_argument("configuration", help="e.g. 3d_fullres, 2d, 3d_fullres_unetrpp; 3d_cascade_fullres once all five "
                   "3d_lowres folds are trained (their validation predictions are its inputs)")
    p.add_argument("fold", help="0-4 or all")
    p.add_argument("--arch", default=None, help="architecture (default: the configuration's)")
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (default from the plan: 1000)")
    p.add_argument("--iters-per-epoch", type=int, default=None, help="training iterations per epoch (default 250)")
    p.add_argument("--time-budget", default=None, help="train for this wall-clock time, e.g. 20m, 1h30m, 23h")
    p.add_argument("--continue", dest="continue_training", action="store_true",
                   help="resume the fold's run from checkpoint_latest.pt with the options it was started with (run.json)")
    p.add_argument("--force", action="store_true", help="start over on a fold that holds an earlier run: deletes that "
                   "run's checkpoints, logs and validation/ first")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--selfreg", action="store_true", default=None, help="add SelfReg self-regularisation losses")
    p.add_argument("--pretrained", default=None, help="initialise weights from this checkpoint")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: 12345; --continue: the run's)")
    p.add_argument("-np", "--num-workers", type=int, default=None,
                   help="data loader worker processes (default: 2; 0 loads batches in the training process)")
    p.add_argument("--no-validation", action="store_true", help="skip the final validation prediction")
    p.add_argument("--loss", default=None, help="loss, by its name in the loss registry (default dice_ce: soft Dice + "
                   "cross-entropy; docs/training.md lists them, an unknown name prints the choices)")
    p.add_argument("--lr-schedule", default=None, help="learning-rate schedule, by its name in the schedule registry "
                   "(default poly; poly-warmup warms up linearly over the first 5 %% for transformer networks)")

    p = command("predict", _cmd_predict, "segment new images with trained folds",
                "Predict every case in INPUT (a folder of <case>_0000<ending> files, one per channel; for a "
                "one-channel model any image file; a folder of DICOM series; or one file) with a sliding window, "
                "mirroring and the fold ensemble; segmentations keep the input's geometry and format. "
                "Postprocessing chosen by find-best is applied when present. The model: -d/-c under the data "
                "root, or -m model.zip.")
    p.add_argument("-i", "--input", required=True, help="input folder or file")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("-m", "--model", default=None, help="model bundle written by `autoseg export` (instead of -d/-c)")
    p.add_argument("-d", "--dataset", default=None, help="dataset the model was trained on (number, name or folder)")
    p.add_argument("-c", "--configuration", default=None,
                   help="trained configuration, e.g. 3d_fullres or 2d (find-best prints the one to use)")
    p.add_argument("-f", "--folds", nargs="+", default=None,
                   help="folds to ensemble (default: all trained, or all in the bundle)")
    p.add_argument("--arch", default=None, help="architecture (default: the one trained for this configuration)")
    p.add_argument("--step", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--no-mirror", action="store_true", help="disable test-time mirroring (8x faster in 3D)")
    p.add_argument("--save-probabilities", action="store_true", help="also write <case>.npz softmax probabilities")
    p.add_argument("--output-format", choices=("nifti", "dicom-seg"), default="nifti",
                   help="nifti: <case> in the input's file format (.nii.gz for DICOM series); dicom-seg: <case>.dcm, "
                   "a DICOM Segmentation referencing the input DICOM series (needs autoseg[dicom])")
    p.add_argument("--checkpoint", default="checkpoint_final.pt", help="checkpoint file name in each fold")
    p.add_argument("--no-postprocessing", action="store_true", help="ignore postprocessing.json")
    p.add_argument("--fp32", action="store_true", help="full precision (default: AMP on CUDA, bf16 autocast on "
                   "CPUs with native bf16, about 2x faster there; float16 accumulators, half the memory)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("-np", "--num-workers", type=int, default=2,
                   help="reader threads and writer threads each (cases read ahead / waiting to be written)")
    p.add_argument("--part", type=int, default=0,
                   help="predict only share PART of the sorted cases (case i goes to part i %% PARTS)")
    p.add_argument("--parts", type=int, default=1,
                   help="number of jobs sharing the input, e.g. a SLURM array (docs/cluster.md)")

    p = command("export", _cmd_export, "pack a trained model into one file for another machine",
                "Write the trained folds of CONFIGURATION as one zip (weights as safetensors, plans, dataset.json, "
                "postprocessing.json, SHA-256 checksums; nothing in it can run code) for `autoseg predict -m`, or "
                "with --format onnx a folder of fold_<k>.onnx networks plus preprocessing.json for other runtimes.")
    p.add_argument("dataset", help=DATASET_HELP)
    p.add_argument("-c", "--configuration", required=True, help="trained configuration, e.g. 3d_fullres")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to export (default: all trained)")
    p.add_argument("--arch", default=None, help="architecture (default: the one trained for this configuration)")
    p.add_argument("--checkpoint", default="checkpoint_final.pt", help="checkpoint file name in each fold")
    p.add_argument("--format", choices=["bundle", "onnx"], default="bundle",
                   help="bundle: one .zip for autoseg predict -m; onnx: a folder of fold_<k>.onnx + preprocessing.json")
    p.add_argument("-o", "--output", required=True, help="the .zip to write (bundle) or a folder (onnx)")

    p = command("import-nnunet", _cmd_import_nnunet, "turn a model trained with nnU-Net v2 into a model bundle",
                "Read an nnU-Net v2 results folder (<Trainer>__<Plans>__<configuration> with plans.json, dataset.json "
                "and fold_<k>/checkpoint_final.pth; PlainConvUNet or ResidualEncoderUNet) and write it as a bundle "
                "for `autoseg predict -m`. Checkpoints are read as data only (no code runs). Details: docs/prediction.md")
    p.add_argument("results_folder", help="e.g. nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres")
    p.add_argument("-o", "--output", required=True, help="the .zip to write")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to import (default: every fold_<k> found)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in each fold folder")

    p = command("ensemble", _cmd_ensemble, "average saved probabilities of several prediction folders",
                "Average the <case>.npz probabilities of several prediction folders and write segmentations.")
    p.add_argument("-i", "--inputs", nargs="+", required=True,
                   help="two or more folders written with --save-probabilities (or fold validation/ folders)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--save-probabilities", action="store_true", help="also write the averaged <case>.npz")
    p.add_argument("--postprocessing", default=None,
                   help="postprocessing.json (or its folder) to apply, as printed by find-best for an ensemble")

    p = command("evaluate", _cmd_evaluate, "compare predictions with reference segmentations",
                "Compute Dice, IoU, HD95 and NSD per case and class; writes PRED/summary.json and prints a table.")
    p.add_argument("prediction", help="folder of predicted segmentations")
    p.add_argument("reference", help="folder of reference segmentations with the same file names")
    p.add_argument("-l", "--labels", type=int, nargs="+", default=None, help="labels to evaluate (default: all found)")
    p.add_argument("--tolerance", type=float, default=1.0, help="NSD tolerance in mm")
    p.add_argument("-np", "--num-workers", type=int, default=2, help="evaluation processes")

    p = command("find-best", _cmd_find_best, "pick the best configuration / ensemble and postprocessing",
                "Evaluate the cross-validation predictions of every trained configuration and their pairwise "
                "ensembles, choose the best, decide postprocessing, write a report and print the predict command.")
    p.add_argument("dataset", help=DATASET_HELP)
    p.add_argument("--configs", nargs="+", default=None, help="restrict to these <config>__<arch> result folders")
    p.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                   help="folds whose validation predictions make up the cross-validation")
    p.add_argument("-np", "--num-workers", type=int, default=2, help="evaluation processes")

    p = command("demo", _cmd_demo, "run the whole pipeline on a small synthetic dataset",
                "Generate a small synthetic dataset and run verify -> plan -> preprocess -> train -> predict -> "
                "evaluate -> find-best on it, printing what each stage did. Minutes on a CPU.")
    p.add_argument("--quick", action="store_true", help="train fold 0 only")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--keep", action="store_true", help="keep an existing demo folder instead of starting fresh")

    command("info", _cmd_info, "show environment, device and the datasets found",
            "Print versions, the device autoseg would use, the data root and each dataset's state.")
    return parser


RESUME_DEFAULT = "rerun the same command: finished work is kept and partial outputs are redone"
# `train` handles its own interruptions (a saved checkpoint and the resume command, autoseg.training.trainer)
RESUME_HINTS: dict[str, str] = {}


def _configure_logging(verbose: bool) -> None:
    """autoseg's own messages at INFO (DEBUG with -v) on stderr; other libraries stay at their WARNING default
    so their chatter (e.g. numexpr's thread notice) does not drown ours."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s" if verbose else "%(message)s")
    )
    logger = logging.getLogger("autoseg")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _configure_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except AutosegError as exc:
        if args.debug:
            raise
        code = getattr(exc, "exit_code", 1)  # an interrupted training exits like the signal that stopped it
        print(f"autoseg {args.command}: {'error: ' if code == 1 else ''}{exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"autoseg {args.command}: interrupted; {RESUME_HINTS.get(args.command, RESUME_DEFAULT)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
