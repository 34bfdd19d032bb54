"""autoseg import-nnunet: an nnU-Net v2 results folder, written here in nnU-Net's format, becomes a bundle that
predicts exactly what our own Predictor predicts with the original network; unsafe or unsupported inputs are
refused with one-line messages. nnU-Net itself is not needed (its side is benchmarks/nnunet_import_parity.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from autoseg import networks
from autoseg.cli import main
from autoseg.contracts.plans import NORM_CT, NORM_ZSCORE
from autoseg.errors import CheckpointError, ConfigurationError
from autoseg.inference.bundle import read_bundle
from autoseg.inference.nnunet_import import (
    import_nnunet,
    load_nnunet_checkpoint,
    nnunet_state_dict,
    plans_from_nnunet,
    read_nnunet_model,
)
from autoseg.inference.predictor import Predictor

FEATURES = [4, 8, 16]
TOPOLOGY = {
    "3d_fullres": {"patch_size": [8, 16, 16], "spacing": [2.0, 1.0, 1.0],
                   "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]]},
    "2d": {"patch_size": [16, 16], "spacing": [1.0, 1.0], "kernel_sizes": [[3, 3], [3, 3], [3, 3]],
           "strides": [[1, 1], [2, 2], [2, 2]]},
}
RESENC_BLOCKS = [1, 3, 2]
STATS = {"max": 300.0, "mean": 60.0, "median": 55.0, "min": -100.0, "percentile_00_5": -80.0,
         "percentile_99_5": 250.0, "std": 70.0}
DATASET_JSON = {"channel_names": {"0": "CT", "1": "T2"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
                "numTraining": 4, "file_ending": ".nii.gz"}


def architecture_entry(name: str, dims: int, configuration: str) -> dict[str, Any]:
    """nnU-Net v2's ``architecture`` entry of plans.json (2.3+ format) for our tiny topology."""
    top = TOPOLOGY[configuration]
    kwargs: dict[str, Any] = {
        "n_stages": 3, "features_per_stage": FEATURES, "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
        "kernel_sizes": top["kernel_sizes"], "strides": top["strides"], "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    if name == "ResidualEncoderUNet":
        kwargs.update(n_blocks_per_stage=RESENC_BLOCKS, n_conv_per_stage_decoder=[1, 1])
    else:
        kwargs.update(n_conv_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2])
    return {"network_class_name": f"dynamic_network_architectures.architectures.{'residual_encoders' if 'Res' in name else 'unet'}.{name}",
            "arch_kwargs": kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def nnunet_plans(network_class: str = "PlainConvUNet") -> dict[str, Any]:
    """An nnU-Net v2 plans.json with a tiny 2d and 3d_fullres configuration (3d_lowres inheriting from it)."""
    def resampling(order: int, is_seg: bool) -> dict[str, Any]:
        return {"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": None}

    configurations = {}
    for name, dims in (("2d", 2), ("3d_fullres", 3)):
        top = TOPOLOGY[name]
        configurations[name] = {
            "data_identifier": f"nnUNetPlans_{name}", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": top["patch_size"], "median_image_size_in_voxels": [10.0, 20.0, 24.0][-dims:],
            "spacing": top["spacing"], "normalization_schemes": ["CTNormalization", "ZScoreNormalization"],
            "use_mask_for_norm": [False, False], "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": resampling(3, False), "resampling_fn_seg_kwargs": resampling(1, True),
            "resampling_fn_probabilities_kwargs": resampling(1, False),
            "architecture": architecture_entry(network_class, dims, name), "batch_dice": False,
        }
    configurations["3d_lowres"] = {"inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres",
                                   "spacing": [3.0, 1.5, 1.5]}
    return {
        "dataset_name": "Dataset123_Tiny", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [2.0, 1.0, 1.0],
        "original_median_shape_after_transp": [10, 20, 24], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": configurations,
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": STATS, "1": dict(STATS, mean=10.0)},
    }


def our_network(configuration: str, architecture: str = "unet", seed: int = 0) -> torch.nn.Module:
    """One of OUR networks, randomly initialised, with perturbed norms (zero-init affines would hide a mix-up)."""
    torch.manual_seed(seed)
    top = TOPOLOGY[configuration]
    options = {"blocks_per_stage": RESENC_BLOCKS} if architecture == "resenc" else {}
    network = networks.build(networks.NetworkSpec(
        architecture, 2, 3, patch_size=top["patch_size"], strides=top["strides"], kernel_sizes=top["kernel_sizes"],
        features=FEATURES, deep_supervision=True, options=options,
    ))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return network.eval()


def write_results_folder(root: Path, configuration: str, network: torch.nn.Module, architecture: str = "unet",
                         plans: dict[str, Any] | None = None, folds: tuple[int, ...] = (0,),
                         extra: dict[str, Any] | None = None) -> Path:
    """``root/<Trainer>__<Plans>__<configuration>/`` as nnU-Net v2 writes it: plans.json, dataset.json and
    fold_<k>/checkpoint_final.pth holding our network's weights under nnU-Net's key names."""
    folder = root / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    folder.mkdir(parents=True)
    plans = plans or nnunet_plans("ResidualEncoderUNet" if architecture == "resenc" else "PlainConvUNet")
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    dims = len(TOPOLOGY[configuration]["patch_size"])
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        checkpoint = {
            "network_weights": nnunet_state_dict(network.state_dict(), architecture),
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.99}]},
            "grad_scaler_state": None,
            # nnU-Net's log holds numpy scalars: the loader must allow exactly these
            "logging": {"mean_fg_dice": [np.float64(0.5), np.float64(0.6)], "epoch_end_timestamps": [1.0, 2.0]},
            "_best_ema": np.float64(0.55), "current_epoch": 1000,
            "init_args": {"plans": plans, "configuration": configuration, "fold": fold, "dataset_json": DATASET_JSON,
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": tuple(range(dims)),
            **(extra or {}),
        }
        torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def test_real_nnunet_key_names():
    # key names and counts as nnU-Net 2.8.1's own networks list them for this topology (3 stages, 2 channels,
    # 3 classes; ResEnc blocks 1, 3, 2): every conv/norm twice (.conv/.all_modules.0) and the encoder twice
    unet = nnunet_state_dict(our_network("3d_fullres").state_dict(), "unet")
    assert len(unet) == 136
    for key in ("encoder.stages.0.0.convs.1.all_modules.1.bias", "decoder.encoder.stages.2.0.convs.0.conv.weight",
                "decoder.stages.1.convs.0.norm.weight", "decoder.transpconvs.0.weight", "decoder.seg_layers.1.bias"):
        assert key in unet
    assert tuple(unet["decoder.transpconvs.1.weight"].shape) == (8, 4, 1, 2, 2)
    assert tuple(unet["decoder.seg_layers.0.weight"].shape) == (3, 8, 1, 1, 1)
    resenc = nnunet_state_dict(our_network("3d_fullres", "resenc").state_dict(), "resenc")
    assert len(resenc) == 256
    assert tuple(resenc["encoder.stages.1.blocks.0.skip.1.conv.weight"].shape) == (8, 4, 1, 1, 1)
    assert tuple(resenc["decoder.encoder.stages.2.blocks.0.skip.1.all_modules.1.bias"].shape) == (16,)
    assert "encoder.stem.convs.0.all_modules.0.weight" in resenc
    assert "encoder.stages.1.blocks.2.conv2.norm.bias" in resenc


def test_plans_mapping_values():
    plans = plans_from_nnunet(nnunet_plans(), DATASET_JSON, "3d_lowres", "plans.json")
    config = plans.configurations["3d_lowres"]
    assert config.target_spacing == [3.0, 1.5, 1.5]  # its own, the rest inherited from 3d_fullres
    assert config.patch_size == [8, 16, 16] and config.dims == 3
    assert config.normalization == [NORM_CT, NORM_ZSCORE] and config.use_mask_for_norm == [False, False]
    assert (config.resampling.order_image, config.resampling.order_label, config.resampling.order_z) == (3, 1, 0)
    assert config.resampling.separate_z is None and config.resampling.anisotropy_threshold == 3.0
    assert config.architecture.name == "unet" and config.architecture.strides[1] == [1, 2, 2]
    assert plans.intensity_stats["0"].percentile_99_5 == 250.0 and plans.intensity_stats["1"].mean == 10.0
    assert plans.labels == {"background": 0, "liver": 1, "tumour": 2}
    # nnU-Net stores medians in the transposed order, ours in the raw order
    raw = nnunet_plans()
    raw["transpose_forward"], raw["transpose_backward"] = [2, 0, 1], [1, 2, 0]
    raw["original_median_spacing_after_transp"] = [3.0, 1.0, 2.0]
    moved = plans_from_nnunet(raw, DATASET_JSON, "3d_fullres", "plans.json")
    assert moved.transpose_forward == [2, 0, 1] and moved.median_spacing == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("configuration,architecture", [("3d_fullres", "unet"), ("2d", "unet"), ("3d_fullres", "resenc")])
def test_import_predicts_like_the_original_network(tmp_path, configuration, architecture):
    network = our_network(configuration, architecture)
    folder = write_results_folder(tmp_path, configuration, network, architecture)
    bundle_path = import_nnunet(folder, tmp_path / "model.zip")

    bundle = read_bundle(bundle_path)
    assert bundle.manifest.architecture == architecture and bundle.manifest.num_classes == 3
    assert [str(fold.fold) for fold, _ in bundle.weights] == ["0"]
    original = network.state_dict()
    assert set(bundle.weights[0][1]) == set(original)
    assert all(torch.equal(bundle.weights[0][1][k], original[k]) for k in original)

    imported = Predictor.from_bundle(bundle_path, device="cpu", mixed_precision=False)
    reference = Predictor([network], bundle.plans, bundle.configuration, 2, device="cpu", mixed_precision=False)
    rng = np.random.default_rng(1)
    shape = (11, 21, 25) if configuration == "3d_fullres" else (3, 21, 25)  # the 2d model predicts slice by slice
    image = np.stack([rng.normal(50, 80, shape), rng.normal(300, 40, shape)]).astype(np.float32)
    ours, _ = imported.predict(image, spacing=(2.0, 1.0, 1.0))
    theirs, _ = reference.predict(image, spacing=(2.0, 1.0, 1.0))
    assert ours.shape == shape
    assert len(np.unique(theirs)) > 1  # a constant map would agree by accident
    np.testing.assert_array_equal(ours, theirs)


def test_cli_import_nnunet(tmp_path, capsys):
    folder = write_results_folder(tmp_path, "3d_fullres", our_network("3d_fullres"), folds=(0, 1))
    assert main(["import-nnunet", str(folder), "-o", str(tmp_path / "model.zip"), "-f", "1"]) == 0
    assert "autoseg predict -m" in capsys.readouterr().out
    assert [str(fold.fold) for fold, _ in read_bundle(tmp_path / "model.zip").weights] == ["1"]


_EXECUTED: list[str] = []


def _record(tag: str) -> str:
    _EXECUTED.append(tag)
    return tag


class Harmless:
    """Unpickling this calls :func:`_record`: proof of execution if the loader ever ran it."""

    def __reduce__(self):
        return (_record, ("executed",))


def test_pickled_object_is_refused_without_running_it(tmp_path):
    folder = write_results_folder(tmp_path, "3d_fullres", our_network("3d_fullres"), extra={"extra": Harmless()})
    path = folder / "fold_0" / "checkpoint_final.pth"
    with pytest.raises(CheckpointError) as info:
        load_nnunet_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "_record" in message and "\n" not in message
    assert _EXECUTED == []
    assert main(["import-nnunet", str(folder), "-o", str(tmp_path / "m.zip")]) == 1
    assert _EXECUTED == [] and not (tmp_path / "m.zip").exists()


def test_unsupported_architecture_is_refused(tmp_path):
    plans = nnunet_plans()
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "my_package.nets.SwinUNETR"
    folder = write_results_folder(tmp_path, "3d_fullres", our_network("3d_fullres"), plans=plans)
    with pytest.raises(ConfigurationError, match=r"'my_package\.nets\.SwinUNETR' is not supported"):
        import_nnunet(folder, tmp_path / "model.zip")


@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(labels={"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1, 2]), "regions"),
    (lambda d: d["labels"].update(ignore=3), "ignore"),
])
def test_region_and_ignore_datasets_are_refused(change, match):
    dataset = json.loads(json.dumps(DATASET_JSON))
    change(dataset)
    with pytest.raises(ConfigurationError, match=match):
        plans_from_nnunet(nnunet_plans(), dataset, "3d_fullres", "plans.json")


def test_weights_that_do_not_fit_name_the_key(tmp_path):
    network = our_network("3d_fullres")
    folder = write_results_folder(tmp_path, "3d_fullres", network)
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    weights = checkpoint["network_weights"]
    weights["decoder.seg_layers.0.bias"] = torch.zeros(5)  # a head for 5 classes: another dataset
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"decoder\.seg_layers\.0\.bias.*shape \(5,\).*\(3,\)"):
        read_nnunet_model(folder)
    del weights["decoder.seg_layers.0.bias"]
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"nothing for autoseg's 'heads\.0\.bias'"):
        read_nnunet_model(folder)


def test_changed_alias_is_refused(tmp_path):
    folder = write_results_folder(tmp_path, "3d_fullres", our_network("3d_fullres"))
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    key = "decoder.encoder.stages.1.0.convs.0.all_modules.0.weight"
    checkpoint["network_weights"][key] = checkpoint["network_weights"][key] + 1.0
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"decoder\.encoder\.stages\.1\.0\.convs\.0\.all_modules\.0\.weight"):
        read_nnunet_model(folder)


@pytest.mark.parametrize("axes,warned", [((0, 1, 2), False), ((1, 2), True), (None, True)])
def test_mirroring_axes_other_than_all_are_warned_about(tmp_path, axes, warned):
    folder = write_results_folder(tmp_path, "3d_fullres", our_network("3d_fullres"),
                                  extra={"inference_allowed_mirroring_axes": axes})
    warnings = read_nnunet_model(folder).warnings
    assert bool(warnings) == warned
    if warned:
        assert "--no-mirror" in warnings[0] and repr(axes) in warnings[0]
