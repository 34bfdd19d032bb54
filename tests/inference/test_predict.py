"""The whole prediction chain: files in, segmentations with the input's geometry out."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.dataset.synthetic import SyntheticSpec, generate
from autoseg.errors import CheckpointError
from autoseg.inference import Predictor, predict
from autoseg.inference.predict import find_input_cases
from autoseg.io import Geometry, read_image, read_segmentation, write_image

from tests.inference.conftest import make_plans, write_fake_checkpoint


class ThresholdNetwork(nn.Module):
    """Known function: class 1 where channel 0 > 100, class 2 where > 200, else background.

    Logits are steep ramps of the intensity, so the softmax argmax is exactly the thresholding (away from the
    thresholds) whatever the window, Gaussian weight, mirroring or fold averaging does to them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :1]
        return torch.cat([torch.zeros_like(v), (v - 100.0), 2 * (v - 150.0)], dim=1)


def _expected_threshold(values: np.ndarray) -> np.ndarray:
    return np.where(values > 200, 2, np.where(values > 100, 1, 0)).astype(np.uint8)


def _predictor(plans, networks, **kwargs) -> Predictor:
    configuration = next(iter(plans.configurations.values()))
    return Predictor(networks, plans, configuration, plans.num_channels, device="cpu", **kwargs)


def _synthetic_cases(tmp_path: Path, **spec) -> Path:
    raw = generate(tmp_path / "raw", SyntheticSpec(num_cases=0, num_test=2, seed=3, **spec))
    return raw / "imagesTs"


def test_output_geometry_equals_input_oblique_anisotropic(tmp_path: Path, preprocessing: str) -> None:
    images = _synthetic_cases(tmp_path, shape=(10, 20, 18), spacing=(3.0, 0.7, 0.9), oblique=True)
    plans = make_plans(3, spacing=(3.0, 0.7, 0.9))
    from tests.inference.conftest import build_tiny_network

    report = predict(images, tmp_path / "out", "unused", "3d_fullres",
                     predictor=_predictor(plans, [build_tiny_network(plans)], mirror=False),
                     save_probabilities=True)
    assert report.ok, report.failures
    assert len(report.written) == 2
    for case_file in sorted(images.glob("*_0000.nii.gz")):
        case_id = case_file.name[: -len("_0000.nii.gz")]
        _, geometry_in = read_image(case_file)
        assert geometry_in.direction != tuple(np.eye(3).ravel())  # really oblique
        segmentation, geometry_out = read_segmentation(tmp_path / "out" / f"{case_id}.nii.gz")
        assert geometry_out.mismatch(geometry_in, tolerance=1e-5) == []
        assert segmentation.shape == geometry_in.shape
        assert set(np.unique(segmentation)) <= {0, 1, 2}
        with np.load(tmp_path / "out" / f"{case_id}.npz", allow_pickle=False) as npz:
            probabilities = npz["probabilities"]
            assert probabilities.dtype == np.float16 and probabilities.shape == (3, *geometry_in.shape)
            np.testing.assert_allclose(probabilities.astype(np.float32).sum(0), 1.0, atol=5e-3)
            top_two = np.sort(probabilities.astype(np.float32), axis=0)[-2:]
            clear = top_two[1] - top_two[0] > 1e-2  # float16 rounding may flip near-ties only
            np.testing.assert_array_equal(np.argmax(probabilities, 0)[clear], segmentation[clear])
    assert not list((tmp_path / "out").glob(".*partial*"))


def _write_known_image(path: Path, shape, spacing, origin=(4.0, -3.0, 10.0), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # positive everywhere (no crop to nonzero), values clear of the thresholds by >= 5
    values = rng.choice(np.array([20.0, 60.0, 140.0, 170.0, 240.0, 300.0]), size=shape).astype(np.float32)
    dims = len(shape)
    geometry = Geometry(tuple(shape), tuple(spacing), tuple(origin[:dims]), tuple(np.eye(dims).ravel().tolist()))
    write_image(values.astype(np.uint8) if path.suffix == ".png" else values, geometry, path)
    return values


def test_known_function_gives_exact_segmentation(tmp_path: Path, preprocessing: str) -> None:
    plans = make_plans(3, patch=(8, 16, 16), spacing=(2.0, 1.0, 1.0))
    inputs = tmp_path / "in"
    values = _write_known_image(inputs / "known_0000.nii.gz", (11, 23, 40), (2.0, 1.0, 1.0))
    report = predict(inputs, tmp_path / "out", "unused", "3d_fullres",
                     predictor=_predictor(plans, [ThresholdNetwork(), ThresholdNetwork()]))
    assert report.ok
    segmentation, _ = read_segmentation(tmp_path / "out" / "known.nii.gz")
    np.testing.assert_array_equal(segmentation, _expected_threshold(values))


def test_image_smaller_than_patch(tmp_path: Path, identity_preprocessing: None) -> None:
    plans = make_plans(3, patch=(8, 16, 16), spacing=(2.0, 1.0, 1.0))
    values = _write_known_image(tmp_path / "in" / "small_0000.nii.gz", (3, 7, 30), (2.0, 1.0, 1.0))
    report = predict(tmp_path / "in" / "small_0000.nii.gz", tmp_path / "out", "unused", "3d_fullres",
                     predictor=_predictor(plans, [ThresholdNetwork()]))
    assert report.ok
    segmentation, geometry = read_segmentation(tmp_path / "out" / "small.nii.gz")
    assert geometry.shape == (3, 7, 30)
    np.testing.assert_array_equal(segmentation, _expected_threshold(values))


def test_2d_rgb_png_model(tmp_path: Path, identity_preprocessing: None) -> None:
    images = _synthetic_cases(tmp_path, dims=2, shape=(30, 20), spacing=(1.0, 1.0), rgb=True, file_ending=".png")
    plans = make_plans(2, channels=3, patch=(16, 16))

    class RedThreshold(ThresholdNetwork):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[1] == 3 and x.ndim == 4  # 3 colour channels, 2D windows
            return super().forward(x)

    report = predict(images, tmp_path / "out", "unused", "2d", predictor=_predictor(plans, [RedThreshold()]))
    assert report.ok, report.failures
    for png in sorted(images.glob("*.png")):
        image, geometry = read_image(png)
        segmentation, geometry_out = read_segmentation(tmp_path / "out" / png.name.replace("_0000", ""))
        assert geometry_out.shape == geometry.shape == image.shape[1:]
        np.testing.assert_array_equal(segmentation, _expected_threshold(image[0]))


def test_bad_inputs_reported_others_written(tmp_path: Path, identity_preprocessing: None) -> None:
    plans = make_plans(3, spacing=(2.0, 1.0, 1.0))
    inputs = tmp_path / "in"
    _write_known_image(inputs / "good_0000.nii.gz", (6, 10, 12), (2.0, 1.0, 1.0))
    _write_known_image(inputs / "twochan_0000.nii.gz", (6, 10, 12), (2.0, 1.0, 1.0))
    _write_known_image(inputs / "twochan_0001.nii.gz", (6, 10, 12), (2.0, 1.0, 1.0))
    (inputs / "corrupt_0000.nii.gz").write_bytes(b"this is not a nifti file")
    (inputs / "weird_0000.xyz").write_bytes(b"???")
    _write_known_image(inputs / "flat_0000.png", (10, 12), (1.0, 1.0))
    (inputs / "notes.txt").write_text("ignored")
    report = predict(inputs, tmp_path / "out", "unused", "3d_fullres",
                     predictor=_predictor(plans, [ThresholdNetwork()]), num_workers=2)
    assert not report.ok
    reasons = dict(report.failures)
    assert sorted(reasons) == ["corrupt", "flat", "twochan", "weird"]
    assert "twochan_0000.nii.gz" in reasons["twochan"] and "expected 1 channel" in reasons["twochan"]
    assert "corrupt_0000.nii.gz" in reasons["corrupt"]
    assert "weird_0000.xyz" in reasons["weird"] and "ending" in reasons["weird"]
    assert "flat_0000.png" in reasons["flat"] and "2D image" in reasons["flat"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz"]


def test_input_case_discovery_gaps_and_single_file(tmp_path: Path) -> None:
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0002.nii.gz", "c.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    cases = {c.case_id: c for c in find_input_cases(tmp_path)}
    assert sorted(cases) == ["a", "b"]
    assert cases["a"].problem is None and [f.name for f in cases["a"].files] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert "_0002" in cases["b"].problem
    single = find_input_cases(tmp_path / "c.nii.gz")
    assert [(c.case_id, c.ending, c.problem) for c in single] == [("c", ".nii.gz", None)]


# ------------------------------------------------------------------------------- checkpoints and folds
def _trained_root(tmp_path: Path, folds=(0, 1), seeds=(0, 0)) -> Path:
    root = tmp_path / "root"
    (root / "raw" / "Dataset001_Test").mkdir(parents=True)
    plans = make_plans(3, spacing=(2.0, 1.0, 1.0))
    for fold, seed in zip(folds, seeds):
        write_fake_checkpoint(root / "results" / "Dataset001_Test" / "3d_fullres__unet" / f"fold_{fold}" /
                              "checkpoint_final.pt", plans, fold=fold, seed=seed)
    return root


def test_ensemble_of_identical_folds_equals_one_fold(tmp_path: Path, identity_preprocessing: None) -> None:
    root = _trained_root(tmp_path, folds=(0, 1), seeds=(7, 7))
    data = np.random.default_rng(0).normal(size=(1, 9, 20, 17)).astype(np.float32)
    both = Predictor.from_folder("1", "3d_fullres", root=root, device="cpu", mirror=False)
    one = Predictor.from_folder("1", "3d_fullres", folds=[0], root=root, device="cpu", mirror=False)
    assert len(both.networks) == 2 and len(one.networks) == 1
    # float16 log-probabilities (the default): log p + log 2 - log 2 rounds once more than log p, ~2**-11
    np.testing.assert_allclose(both.predict_preprocessed(data), one.predict_preprocessed(data), atol=1e-3)


def test_fold_ensemble_is_mean_of_fold_softmax(tmp_path: Path, identity_preprocessing: None) -> None:
    root = _trained_root(tmp_path, folds=(0, 1), seeds=(1, 2))
    data = np.random.default_rng(1).normal(size=(1, 8, 16, 16)).astype(np.float32)
    kwargs = dict(root=root, device="cpu", mirror=False, mixed_precision=False)  # exact fp32 comparison
    mean = Predictor.from_folder("Test", "3d_fullres", **kwargs).predict_preprocessed(data)
    fold0 = Predictor.from_folder("Test", "3d_fullres", folds=[0], **kwargs).predict_preprocessed(data)
    fold1 = Predictor.from_folder("Test", "3d_fullres", folds=[1], **kwargs).predict_preprocessed(data)
    assert np.abs(fold0 - fold1).max() > 1e-3  # the folds really differ
    np.testing.assert_allclose(mean, (fold0 + fold1) / 2, atol=1e-6)
    np.testing.assert_allclose(mean.sum(0), 1.0, atol=1e-5)
    # the network from the checkpoint is the registry's U-Net with the saved weights, single window = forward
    network = one_network = Predictor.from_folder("Test", "3d_fullres", folds=[0], **kwargs).networks[0]
    with torch.inference_mode():
        direct = torch.softmax(one_network(torch.from_numpy(data)[None]), 1)[0].numpy()
    np.testing.assert_allclose(fold0, direct, atol=1e-5)
    assert not network.training


def test_predictor_api_on_arrays(tmp_path: Path, identity_preprocessing: None) -> None:
    plans = make_plans(3, spacing=(2.0, 1.0, 1.0))
    predictor = _predictor(plans, [ThresholdNetwork()])
    values = np.random.default_rng(2).choice([50.0, 150.0, 250.0], size=(1, 5, 9, 13)).astype(np.float32)
    geometry = Geometry((5, 9, 13), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    segmentation, probabilities = predictor.predict_array(values, geometry)
    assert segmentation.shape == (5, 9, 13) and probabilities.shape == (3, 5, 9, 13)
    np.testing.assert_array_equal(segmentation, _expected_threshold(values[0]))
    write_image(values[0], geometry, tmp_path / "x_0000.nii.gz")
    seg_files, _, geometry_files = predictor.predict_files([tmp_path / "x_0000.nii.gz"])
    np.testing.assert_array_equal(seg_files, segmentation)
    assert geometry_files.mismatch(geometry) == []


def test_missing_fold_and_foreign_checkpoint(tmp_path: Path) -> None:
    root = _trained_root(tmp_path, folds=(0,), seeds=(0,))
    with pytest.raises(CheckpointError, match="fold_3"):
        Predictor.from_folder("1", "3d_fullres", folds=[3], root=root, device="cpu")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt"):
        Predictor.from_checkpoints([foreign], device="cpu")


def test_cli_predict_exit_codes(tmp_path: Path, identity_preprocessing: None) -> None:
    from autoseg.cli import main

    root = _trained_root(tmp_path, folds=(0,), seeds=(0,))
    inputs = tmp_path / "in"
    _write_known_image(inputs / "ok_0000.nii.gz", (6, 16, 16), (2.0, 1.0, 1.0))
    args = ["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-d", "1", "-c", "3d_fullres",
            "--root", str(root), "--device", "cpu", "--no-mirror", "-np", "1"]
    assert main(args) == 0
    assert (tmp_path / "out" / "ok.nii.gz").is_file()
    (inputs / "bad_0000.nii.gz").write_bytes(b"garbage")
    assert main(args) == 1
    shutil.rmtree(tmp_path / "out")


def test_postprocessing_json_applied_when_present(tmp_path: Path, identity_preprocessing: None) -> None:
    from autoseg.contracts.postprocessing import PostprocessingRules, save_postprocessing
    from autoseg.inference.predictor import load_postprocessing_rules

    plans = make_plans(3, spacing=(2.0, 1.0, 1.0))
    model = tmp_path / "results" / "3d_fullres__unet"
    values = np.full((6, 16, 20), 20.0, np.float32)
    values[1:5, 2:10, 2:10] = 150.0  # large class-1 blob
    values[2:4, 12:14, 15:18] = 150.0  # small separate class-1 blob
    write_image(values, Geometry((6, 16, 20), (2.0, 1.0, 1.0), (0.0,) * 3, tuple(np.eye(3).ravel())),
                tmp_path / "in" / "pp_0000.nii.gz")
    save_postprocessing(model, PostprocessingRules(largest_component_labels=[1], labels=[1, 2]))
    predictor = _predictor(plans, [ThresholdNetwork()], sources=[model / "fold_0" / "checkpoint_final.pt"])
    # the rules travel with the predictor (from_folder and from_bundle set them; here by hand)
    predictor.postprocessing = load_postprocessing_rules(model)

    assert predict(tmp_path / "in", tmp_path / "raw_out", "x", "3d_fullres", predictor=predictor,
                   postprocess=False).ok
    plain, _ = read_segmentation(tmp_path / "raw_out" / "pp.nii.gz")
    np.testing.assert_array_equal(plain, _expected_threshold(values))
    assert predict(tmp_path / "in", tmp_path / "pp_out", "x", "3d_fullres", predictor=predictor).ok
    processed, _ = read_segmentation(tmp_path / "pp_out" / "pp.nii.gz")
    expected = _expected_threshold(values)
    expected[2:4, 12:14, 15:18] = 0
    np.testing.assert_array_equal(processed, expected)


class EchoPreviousStage(nn.Module):
    """Cascade network whose logits are the one-hot previous-stage channels (with a zero background)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 1 + 2  # one image channel + one-hot of the 2 foreground labels
        return torch.cat([torch.full_like(x[:, :1], 0.5), x[:, 1:]], dim=1) * 10


def test_cascade_feeds_previous_stage_as_one_hot(tmp_path: Path, identity_preprocessing: None) -> None:
    from autoseg.inference.predictor import foreground_one_hot

    np.testing.assert_array_equal(foreground_one_hot(np.array([[0, 1, 2]]), 3),
                                  [[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
    low = make_plans(3, spacing=(2.0, 1.0, 1.0), name="3d_lowres")
    cascade_plans = make_plans(3, spacing=(2.0, 1.0, 1.0), name="3d_cascade_fullres")
    cascade_plans.configurations["3d_cascade_fullres"].previous_stage = "3d_lowres"
    cascade = Predictor([EchoPreviousStage()], cascade_plans, cascade_plans.configurations["3d_cascade_fullres"],
                        in_channels=3, device="cpu")
    cascade.previous_stage = _predictor(low, [ThresholdNetwork()])
    values = _write_known_image(tmp_path / "in" / "c_0000.nii.gz", (5, 12, 20), (2.0, 1.0, 1.0))
    report = predict(tmp_path / "in", tmp_path / "out", "x", "3d_cascade_fullres", predictor=cascade)
    assert report.ok, report.failures
    segmentation, _ = read_segmentation(tmp_path / "out" / "c.nii.gz")
    np.testing.assert_array_equal(segmentation, _expected_threshold(values))
    # without a previous-stage model the cascade says what is missing
    cascade.previous_stage = None
    report = predict(tmp_path / "in", tmp_path / "out2", "x", "3d_cascade_fullres", predictor=cascade)
    assert not report.ok and "3d_lowres" in report.failures[0][1]


def test_mixed_precision_follows_the_device_and_can_be_switched_off(tmp_path: Path, identity_preprocessing: None) -> None:
    from autoseg.device import cpu_supports_bf16

    root = _trained_root(tmp_path, folds=(0,), seeds=(1,))
    data = np.random.default_rng(3).normal(size=(1, 8, 16, 16)).astype(np.float32)
    fast = Predictor.from_folder("Test", "3d_fullres", root=root, device="cpu", mirror=False)
    exact = Predictor.from_folder("Test", "3d_fullres", root=root, device="cpu", mirror=False, mixed_precision=False)
    assert exact.amp is None
    assert fast.amp == (torch.bfloat16 if cpu_supports_bf16() else None)
    # bf16 changes probabilities by a few 1e-3 at most, never the sum-to-one property
    low, full = fast.predict_preprocessed(data), exact.predict_preprocessed(data)
    assert np.abs(low - full).max() < 0.05
    np.testing.assert_allclose(low.sum(0), 1.0, atol=1e-3)


# --------------------------------------------------------------------------- jobs, output folder, workers
def test_parts_are_disjoint_complete_and_deterministic(tmp_path: Path) -> None:
    from autoseg.errors import ConfigurationError
    from autoseg.inference.predict import select_part

    for index in (3, 0, 9, 1, 4, 2, 7):  # created out of order: the split follows the sorted case names
        (tmp_path / f"case{index}_0000.nii.gz").write_bytes(b"")
    cases = find_input_cases(tmp_path)
    for parts in (1, 2, 3, 4, 10):
        shares = [[c.case_id for c in select_part(cases, part, parts)] for part in range(parts)]
        everything = [case_id for share in shares for case_id in share]
        assert sorted(everything) == [c.case_id for c in cases]  # complete
        assert len(set(everything)) == len(everything)  # disjoint
        assert shares == [[c.case_id for c in select_part(find_input_cases(tmp_path), p, parts)] for p in range(parts)]
    assert [c.case_id for c in select_part(cases, 1, 3)] == ["case1", "case4"]  # sorted case i -> part i % 3
    for part, parts in ((4, 4), (-1, 2), (0, 0)):
        with pytest.raises(ConfigurationError, match=r"--part .* expected 0 <= part < parts"):
            select_part(cases, part, parts)


def test_cli_rejects_a_part_outside_the_parts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from autoseg.cli import main

    root = _trained_root(tmp_path, folds=(0,), seeds=(0,))
    _write_known_image(tmp_path / "in" / "a_0000.nii.gz", (6, 16, 16), (2.0, 1.0, 1.0))
    code = main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "1", "-c", "3d_fullres",
                 "--root", str(root), "--device", "cpu", "--part", "4", "--parts", "4"])
    error = capsys.readouterr().err.strip()
    assert code != 0 and len(error.splitlines()) == 1 and "--part 4 --parts 4" in error
    assert not (tmp_path / "out").exists()  # refused before anything was created


class MustNotRun(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a case was predicted although the output folder is unusable")


def test_unusable_output_folder_is_found_before_any_prediction(tmp_path: Path, identity_preprocessing: None) -> None:
    import os

    from autoseg.errors import PredictionError

    plans = make_plans(3, spacing=(2.0, 1.0, 1.0))
    _write_known_image(tmp_path / "in" / "a_0000.nii.gz", (6, 16, 16), (2.0, 1.0, 1.0))
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(PredictionError, match=r"a_file/out: cannot create the output folder .*pass a writable -o"):
        predict(tmp_path / "in", tmp_path / "a_file" / "out", "x", "3d_fullres",
                predictor=_predictor(plans, [MustNotRun()]))
    if os.geteuid() == 0:
        return  # root writes into read-only folders; the probe cannot fail there
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        with pytest.raises(PredictionError, match=r"read_only: output folder is not writable .*chmod u\+w"):
            predict(tmp_path / "in", read_only, "x", "3d_fullres", predictor=_predictor(plans, [MustNotRun()]))
    finally:
        read_only.chmod(0o755)


def test_every_case_written_once_failures_reported_per_case(tmp_path: Path, identity_preprocessing: None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Reader and writer pools beside the network loop: with read failures, a write failure and more cases
    than workers, every good case is written exactly once, in input order, and each failure names its case."""
    import threading

    plans = make_plans(3, spacing=(2.0, 1.0, 1.0))
    inputs = tmp_path / "in"
    expected = {}
    for index in range(7):
        expected[f"c{index}"] = _write_known_image(inputs / f"c{index}_0000.nii.gz", (6, 16, 16), (2.0, 1.0, 1.0),
                                                   seed=index)
    (inputs / "c2_0000.nii.gz").write_bytes(b"garbage")  # read fails
    _write_known_image(inputs / "c5_0001.nii.gz", (6, 16, 16), (2.0, 1.0, 1.0))  # 2 channels, model takes 1
    predictor = _predictor(plans, [ThresholdNetwork()])
    restore = predictor.restore_segmentation
    threads, network_calls = set(), []

    def restore_or_fail(log_probabilities, properties, probabilities=None):
        threads.add(threading.current_thread().name)
        if properties.case_id == "c4":
            raise RuntimeError("disk full while writing c4")
        return restore(log_probabilities, properties, probabilities)

    network = predictor.predict_log_probabilities

    def counted(data):
        network_calls.append(threading.current_thread().name)
        return network(data)

    monkeypatch.setattr(predictor, "restore_segmentation", restore_or_fail)
    monkeypatch.setattr(predictor, "predict_log_probabilities", counted)
    report = predict(inputs, tmp_path / "out", "x", "3d_fullres", predictor=predictor, num_workers=2)

    assert not report.ok
    assert [p.name for p in report.written] == ["c0.nii.gz", "c1.nii.gz", "c3.nii.gz", "c6.nii.gz"]
    assert sorted(case for case, _ in report.failures) == ["c2", "c4", "c5"]
    reasons = dict(report.failures)
    assert "c2_0000.nii.gz" in reasons["c2"] and "disk full while writing c4" in reasons["c4"]
    assert "expected 1 channel" in reasons["c5"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c0.nii.gz", "c1.nii.gz", "c3.nii.gz",
                                                                   "c6.nii.gz"]  # no partial files
    for case_id in ("c0", "c1", "c3", "c6"):
        segmentation, _ = read_segmentation(tmp_path / "out" / f"{case_id}.nii.gz")
        np.testing.assert_array_equal(segmentation, _expected_threshold(expected[case_id]))
    # the network ran in the calling thread once per readable case; restores ran in the writer threads
    assert network_calls == [threading.current_thread().name] * 5
    assert threads and all(name.startswith("autoseg-write") for name in threads)


def test_a_killed_runs_temporary_file_of_a_case_is_cleared_when_the_case_is_written(
    tmp_path: Path, identity_preprocessing: None
) -> None:
    plans = make_plans(3, patch=(8, 16, 16), spacing=(2.0, 1.0, 1.0))
    _write_known_image(tmp_path / "in" / "small_0000.nii.gz", (3, 7, 30), (2.0, 1.0, 1.0))
    out = tmp_path / "out"
    out.mkdir()
    mine = out / ".small.nii.gz.a81x.partial.nii.gz"  # this case's, from a run killed while writing it
    other = out / ".other.nii.gz.q2.partial.nii.gz"  # another job's case (--part): not ours to delete
    mine.write_bytes(b"half")
    other.write_bytes(b"half")
    report = predict(tmp_path / "in" / "small_0000.nii.gz", out, "unused", "3d_fullres",
                     predictor=_predictor(plans, [ThresholdNetwork()]))
    assert report.ok
    assert not mine.exists() and other.exists()


def test_results_held_at_once_share_one_ram_budget(tmp_path: Path, identity_preprocessing: None) -> None:
    """With -np N up to 2N + 1 network-grid results are alive; together they stay within RESULTS_RAM_BYTES."""
    from autoseg.inference.streaming import RESULT_RAM_BYTES, RESULTS_RAM_BYTES

    plans = make_plans(3, patch=(8, 16, 16), spacing=(2.0, 1.0, 1.0))
    _write_known_image(tmp_path / "in" / "small_0000.nii.gz", (3, 7, 30), (2.0, 1.0, 1.0))
    predictor = _predictor(plans, [ThresholdNetwork()])
    assert predictor.result_ram_bytes == RESULT_RAM_BYTES
    assert predict(tmp_path / "in", tmp_path / "out", predictor=predictor, num_workers=3).ok
    assert predictor.result_ram_bytes == RESULTS_RAM_BYTES // 7
    assert (2 * 3 + 1) * predictor.result_ram_bytes <= RESULTS_RAM_BYTES
