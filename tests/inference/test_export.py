"""`autoseg export` bundles: one zip predicts on another machine exactly as the data root did, and a zip that
could run code, escape its folder, or was changed is refused with one line."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.cli import main
from autoseg.contracts.postprocessing import PostprocessingRules, save_postprocessing
from autoseg.errors import CheckpointError, ConfigurationError
from autoseg.inference import Predictor
from autoseg.inference.bundle import BUNDLE_SCHEMA_VERSION, read_bundle
from autoseg.inference.export import export_model
from autoseg.io import Geometry, read_segmentation, write_image

from tests.inference.conftest import make_plans, write_fake_checkpoint

DATASET = "Dataset001_Test"


def trained_root(base: Path, folds=(0, 1), postprocessing: PostprocessingRules | None = None) -> Path:
    """A data root with a raw dataset.json and fake trained folds of a tiny U-Net (different weights)."""
    root = base / "root"
    raw = root / "raw" / DATASET
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "object": 1, "satellite": 2},
        "numTraining": 0, "file_ending": ".nii.gz"}))
    plans = make_plans(3, spacing=(2.0, 1.0, 1.0))
    model = root / "results" / DATASET / "3d_fullres__unet"
    for fold in folds:
        write_fake_checkpoint(model / f"fold_{fold}" / "checkpoint_final.pt", plans, fold=fold, seed=10 + fold)
    if postprocessing is not None:
        save_postprocessing(model, postprocessing)
    return root


def write_scans(folder: Path) -> None:
    """Two scans as people name them (no _0000), with positive values so nothing is cropped away."""
    rng = np.random.default_rng(4)
    for name, shape in (("patient_a", (7, 18, 21)), ("patient_b", (9, 16, 16))):
        values = rng.uniform(1.0, 300.0, size=shape).astype(np.float32)
        geometry = Geometry(shape, (2.0, 1.0, 1.0), (3.0, -2.0, 7.0), tuple(np.eye(3).ravel()))
        write_image(values, geometry, folder / f"{name}.nii.gz")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, bundle) of a two-fold model with postprocessing rules."""
    base = tmp_path_factory.mktemp("export")
    rules = PostprocessingRules(largest_component_labels=[1], labels=[1, 2])
    root = trained_root(base, postprocessing=rules)
    bundle = base / "model.zip"
    assert main(["export", "1", "-c", "3d_fullres", "-o", str(bundle), "--root", str(root)]) == 0
    return root, bundle


def test_bundle_predicts_like_the_data_root_on_a_machine_without_one(exported, tmp_path, monkeypatch) -> None:
    root, bundle = exported
    scans = tmp_path / "scans"
    write_scans(scans)
    common = ["-i", str(scans), "--device", "cpu", "-np", "1"]
    assert main(["predict", *common, "-o", str(tmp_path / "from_root"), "-d", "1", "-c", "3d_fullres",
                 "--root", str(root)]) == 0
    # "another machine": a fresh folder, AUTOSEG_HOME pointing at an empty one, the bundle copied over
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "empty_home").mkdir(parents=True)
    (elsewhere / "model.zip").write_bytes(bundle.read_bytes())
    monkeypatch.setenv("AUTOSEG_HOME", str(elsewhere / "empty_home"))
    monkeypatch.chdir(elsewhere)
    assert main(["predict", *common, "-o", "from_bundle", "-m", "model.zip"]) == 0
    assert list((elsewhere / "empty_home").iterdir()) == []
    for name in ("patient_a.nii.gz", "patient_b.nii.gz"):
        expected, geometry_root = read_segmentation(tmp_path / "from_root" / name)
        found, geometry_bundle = read_segmentation(elsewhere / "from_bundle" / name)
        assert geometry_bundle.mismatch(geometry_root) == []
        np.testing.assert_array_equal(found, expected)
        assert set(np.unique(found)) - {0} != set()  # the random network really segments something


def test_bundle_contents_and_manifest(exported) -> None:
    root, bundle = exported
    with zipfile.ZipFile(bundle) as archive:
        names = sorted(archive.namelist())
        members = {name: archive.read(name) for name in names}
    assert names == ["configuration.json", "dataset.json", "fold_0.safetensors", "fold_1.safetensors",
                     "manifest.json", "plans.json", "postprocessing.json"]
    manifest = json.loads(members["manifest.json"])
    assert manifest["format"] == "autoseg-bundle" and manifest["schema_version"] == BUNDLE_SCHEMA_VERSION
    assert manifest["autoseg_version"] and [f["fold"] for f in manifest["folds"]] == [0, 1]
    assert sorted(manifest["checksums"]) == [n for n in names if n != "manifest.json"]
    for name, digest in manifest["checksums"].items():
        assert hashlib.sha256(members[name]).hexdigest() == digest
    assert json.loads(members["postprocessing.json"])["largest_component_labels"] == [1]
    assert json.loads(members["dataset.json"])["channel_names"] == {"0": "MRI"}
    # the weights are the checkpoints' tensors, bit for bit
    checkpoint = torch.load(root / "results" / DATASET / "3d_fullres__unet" / "fold_1" / "checkpoint_final.pt",
                            weights_only=True)
    loaded = read_bundle(bundle)
    fold, state = loaded.weights[1]
    assert fold.fold == 1 and fold.checkpoint == "checkpoint_final.pt" and fold.epoch == 1
    assert sorted(state) == sorted(checkpoint["network"])
    for key, value in checkpoint["network"].items():
        assert torch.equal(state[key], value)


def test_export_is_deterministic_and_selects_folds(exported, tmp_path) -> None:
    root, bundle = exported
    again = tmp_path / "again.zip"
    export_model("1", "3d_fullres", again, root=root)
    assert again.read_bytes() == bundle.read_bytes()
    single = export_model("1", "3d_fullres", tmp_path / "fold1.zip", folds=["1"], root=root)[0]
    assert [f.fold for f, _ in read_bundle(single).weights] == [1]
    with pytest.raises(CheckpointError, match="fold_4"):
        export_model("1", "3d_fullres", tmp_path / "x.zip", folds=[4], root=root)
    with pytest.raises(ConfigurationError, match="zip"):
        export_model("1", "3d_fullres", tmp_path / "model.bin", root=root)


def test_from_bundle_carries_postprocessing_and_fold_choice(exported) -> None:
    _, bundle = exported
    predictor = Predictor.from_bundle(bundle, device="cpu")
    assert len(predictor.networks) == 2
    assert predictor.postprocessing is not None and predictor.postprocessing.largest_component_labels == [1]
    assert predictor.configuration.name == "3d_fullres" and predictor.plans.num_classes == 3
    assert Predictor.from_bundle(bundle, device="cpu", postprocess=False).postprocessing is None
    assert len(Predictor.from_bundle(bundle, folds=[1], device="cpu").networks) == 1
    with pytest.raises(CheckpointError, match="fold.*3.*not in this bundle"):
        Predictor.from_bundle(bundle, folds=[3], device="cpu")


# --------------------------------------------------------------------------------------- refused bundles
def _members(bundle: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(bundle) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _write_zip(path: Path, members: dict[str, bytes], infos: dict[str, zipfile.ZipInfo] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr((infos or {}).get(name, name), data)
    return path


def _with_checksums(members: dict[str, bytes], **manifest_changes) -> dict[str, bytes]:
    """Members with a manifest whose checksums match them: only the check under test can refuse."""
    manifest = json.loads(members["manifest.json"])
    manifest["checksums"] = {n: hashlib.sha256(d).hexdigest() for n, d in members.items() if n != "manifest.json"}
    manifest.update(manifest_changes)
    return {**members, "manifest.json": json.dumps(manifest).encode()}


class _RunsCode:
    """Unpickling this creates a file: proof that loading ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_in_place_of_weights_is_refused_without_running_it(exported, tmp_path) -> None:
    _, bundle = exported
    marker = tmp_path / "pwned"
    members = _members(bundle)
    members["fold_0.safetensors"] = pickle.dumps({"weight": _RunsCode(str(marker))})
    tampered = _write_zip(tmp_path / "pickle.zip", _with_checksums(members))
    with pytest.raises(CheckpointError, match="fold_0.safetensors is a pickle"):
        read_bundle(tampered)
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, buffer)  # torch.save's zip-of-pickles, the checkpoint format
    members["fold_0.safetensors"] = buffer.getvalue()
    with pytest.raises(CheckpointError, match="pickle"):
        read_bundle(_write_zip(tmp_path / "torchsave.zip", _with_checksums(members)))
    assert not marker.exists()


@pytest.mark.parametrize("name, message", [
    ("../evil.json", "contains '..'"),
    ("/etc/evil.json", "absolute path"),
    ("C:/evil.json", "absolute path"),
    ("sub\\evil.json", "backslash"),
    ("fold_0.pt", "unexpected member 'fold_0.pt' \\(a pickle"),
    ("notes.txt", "unexpected member 'notes.txt'"),
    ("weights/fold_0.safetensors", "unexpected member"),
])
def test_unsafe_or_unknown_member_names_are_refused(exported, tmp_path, name, message) -> None:
    _, bundle = exported
    members = {**_members(bundle), name: b"{}"}
    with pytest.raises(CheckpointError, match=message):
        read_bundle(_write_zip(tmp_path / "bad.zip", _with_checksums(members)))


def test_links_and_folders_are_refused(exported, tmp_path) -> None:
    _, bundle = exported
    link = zipfile.ZipInfo("dataset.json")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    members = _members(bundle)
    members["dataset.json"] = b"/etc/passwd"
    with pytest.raises(CheckpointError, match="folder or link"):
        read_bundle(_write_zip(tmp_path / "link.zip", _with_checksums(members), {"dataset.json": link}))


def test_changed_missing_or_unlisted_members_are_refused(exported, tmp_path) -> None:
    _, bundle = exported
    members = _members(bundle)
    changed = dict(members, **{"plans.json": members["plans.json"].replace(b"Dataset001_Test", b"Dataset001_Tess")})
    with pytest.raises(CheckpointError, match="plans.json has SHA-256 .* the manifest says"):
        read_bundle(_write_zip(tmp_path / "changed.zip", changed))
    weights = bytearray(members["fold_1.safetensors"])
    weights[-1] ^= 0xFF  # one bit of one weight
    with pytest.raises(CheckpointError, match="fold_1.safetensors has SHA-256"):
        read_bundle(_write_zip(tmp_path / "bitflip.zip", dict(members, **{"fold_1.safetensors": bytes(weights)})))
    without = {n: d for n, d in members.items() if n != "fold_1.safetensors"}
    with pytest.raises(CheckpointError, match="fold_1.safetensors listed in the manifest are missing"):
        read_bundle(_write_zip(tmp_path / "missing.zip", without))
    extra = dict(members, **{"fold_2.safetensors": members["fold_1.safetensors"]})
    with pytest.raises(CheckpointError, match="fold_2.safetensors not listed"):
        read_bundle(_write_zip(tmp_path / "extra.zip", extra))


def test_manifest_missing_foreign_or_newer_is_refused(exported, tmp_path) -> None:
    _, bundle = exported
    members = _members(bundle)
    without = {n: d for n, d in members.items() if n != "manifest.json"}
    with pytest.raises(CheckpointError, match="no manifest.json"):
        read_bundle(_write_zip(tmp_path / "nomanifest.zip", without))
    with pytest.raises(CheckpointError, match=f"schema version 99 .* newer than this autoseg reads \\({BUNDLE_SCHEMA_VERSION}\\); upgrade"):
        read_bundle(_write_zip(tmp_path / "newer.zip", _with_checksums(members, schema_version=99)))
    with pytest.raises(CheckpointError, match="format 'something-else'"):
        read_bundle(_write_zip(tmp_path / "foreign.zip", _with_checksums(members, format="something-else")))
    (tmp_path / "notzip.zip").write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="not a zip"):
        read_bundle(tmp_path / "notzip.zip")


def test_cli_reports_a_bad_bundle_in_one_line(exported, tmp_path, capsys) -> None:
    _, bundle = exported
    members = {**_members(bundle), "../../escape.json": b"{}"}
    bad = _write_zip(tmp_path / "bad.zip", _with_checksums(members))
    (tmp_path / "in").mkdir()
    write_scans(tmp_path / "in")
    code = main(["predict", "-m", str(bad), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--device", "cpu"])
    error = capsys.readouterr().err.strip()
    assert code == 1 and len(error.splitlines()) == 1
    assert str(bad) in error and "'..'" in error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_predict_needs_one_model_source(exported, tmp_path, capsys) -> None:
    _, bundle = exported
    args = ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out")]
    assert main(args) == 1
    assert "-m model.zip" in capsys.readouterr().err
    assert main([*args, "-m", str(bundle), "-d", "1"]) == 1
    assert "leave out -d/-c" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ cascades
def cascade_root(base: Path) -> Path:
    """A root with 3d_lowres (two folds, coarser spacing) and 3d_cascade_fullres (one fold) of tiny U-Nets."""
    from dataclasses import asdict

    from autoseg import networks

    root = base / "cascade_root"
    (root / "raw" / DATASET).mkdir(parents=True)
    plans = make_plans(3, spacing=(4.0, 2.0, 2.0), name="3d_lowres")
    full = make_plans(3, spacing=(2.0, 1.0, 1.0), name="3d_cascade_fullres").configurations["3d_cascade_fullres"]
    full.previous_stage = "3d_lowres"
    plans.configurations["3d_cascade_fullres"] = full
    for name, folds, in_channels in (("3d_lowres", (0, 1), 1), ("3d_cascade_fullres", (0,), 1 + 2)):
        configuration = plans.configurations[name]
        for fold in folds:
            torch.manual_seed(20 + fold + in_channels)
            network = networks.build(configuration.architecture.network_spec(in_channels, 3))
            path = root / "results" / DATASET / f"{name}__unet" / f"fold_{fold}" / "checkpoint_final.pt"
            path.parent.mkdir(parents=True)
            torch.save({"format": "autoseg-checkpoint", "format_version": 1, "network": network.state_dict(),
                        "optimizer": None, "scheduler": None, "rng": {},
                        "metadata": {"dataset_name": DATASET, "configuration": asdict(configuration),
                                     "plans": plans.to_json(), "fold": fold, "epoch": 3, "architecture": "unet",
                                     "in_channels": in_channels, "num_classes": 3, "selfreg": False, "curves": {}}},
                       path)
    return root


def test_a_cascade_bundle_carries_its_first_stage(tmp_path, monkeypatch) -> None:
    root = cascade_root(tmp_path)
    bundle = export_model("1", "3d_cascade_fullres", tmp_path / "cascade.zip", root=root)[0]
    loaded = read_bundle(bundle)
    assert loaded.manifest.previous_stage is not None
    assert loaded.manifest.previous_stage.configuration == "3d_lowres"
    assert [f.weights for f, _ in loaded.previous_weights] == ["previous_fold_0.safetensors",
                                                               "previous_fold_1.safetensors"]
    assert [f.weights for f, _ in loaded.weights] == ["fold_0.safetensors"]
    predictor = Predictor.from_bundle(bundle, device="cpu")
    assert predictor.previous_stage is not None and len(predictor.previous_stage.networks) == 2
    assert predictor.previous_stage.postprocessing is None and predictor.in_channels == 3

    scans = tmp_path / "scans"
    write_scans(scans)
    common = ["-i", str(scans), "--device", "cpu", "-np", "1", "--no-mirror"]
    assert main(["predict", *common, "-o", str(tmp_path / "from_root"), "-d", "1", "-c", "3d_cascade_fullres",
                 "--root", str(root)]) == 0
    monkeypatch.setenv("AUTOSEG_HOME", str(tmp_path / "empty_home"))
    assert main(["predict", *common, "-o", str(tmp_path / "from_bundle"), "-m", str(bundle)]) == 0
    for name in ("patient_a.nii.gz", "patient_b.nii.gz"):
        np.testing.assert_array_equal(read_segmentation(tmp_path / "from_bundle" / name)[0],
                                      read_segmentation(tmp_path / "from_root" / name)[0])

    # a bundle whose cascade lost its first stage is refused
    members = _members(bundle)
    manifest = json.loads(members["manifest.json"])
    manifest["previous_stage"] = None
    members = {n: d for n, d in members.items() if not n.startswith("previous_")}
    members["manifest.json"] = json.dumps(manifest).encode()
    with pytest.raises(CheckpointError, match="needs previous stage '3d_lowres', the bundle holds None"):
        read_bundle(_write_zip(tmp_path / "headless.zip", _with_checksums(members)))
    with pytest.raises(ConfigurationError, match="cascade .* export it as a bundle"):
        export_model("1", "3d_cascade_fullres", tmp_path / "onnx", format="onnx", root=root)
