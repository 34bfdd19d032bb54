"""`verify` names each defect and the file, exits 1 on errors and 0 on a clean dataset, never writes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.cli import main
from autoseg.dataset.synthetic import SyntheticSpec, generate
from autoseg.dataset.verify import (
    GEOMETRY_TOLERANCE,
    Problem,
    geometry_differences,
    non_integer_values,
    spacing_problem,
    verify_dataset,
)
from autoseg.io import Geometry, read_image, read_segmentation, write_image, write_segmentation

TINY_3D = SyntheticSpec(num_cases=3, num_test=1, dims=3, shape=(8, 10, 10), spacing=(2.5, 0.8, 0.8), channels=2,
                        oblique=True, seed=3)


def make_3d(tmp_path: Path) -> Path:
    return generate(tmp_path / "Dataset100_Tiny", TINY_3D)


def verify_cli(dataset: Path, capsys: pytest.CaptureFixture[str], workers: int = 1) -> tuple[int, str]:
    code = main(["verify", str(dataset), "-np", str(workers)])
    return code, capsys.readouterr().out


def problems_of(dataset: Path, check: str) -> list[Problem]:
    return [p for p in verify_dataset(dataset, num_workers=1).problems if p.check == check]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_json(dataset: Path, **changes: object) -> None:
    data = json.loads((dataset / "dataset.json").read_text())
    data.update(changes)
    (dataset / "dataset.json").write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------ clean datasets
def test_clean_3d_multichannel_dataset_verifies_with_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    before = snapshot(dataset)
    code, out = verify_cli(dataset, capsys)
    assert code == 0, out
    assert out.strip().splitlines()[-1] == "Dataset100_Tiny: OK (3 training cases, 1 test case, no problems)"
    assert snapshot(dataset) == before, "verify must never modify the dataset"


@pytest.mark.parametrize("rgb", [False, True])
def test_clean_2d_png_dataset_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str], rgb: bool) -> None:
    dataset = generate(tmp_path / "Dataset101_Png", SyntheticSpec(num_cases=2, dims=2, shape=(16, 20), spacing=(1.0, 1.0),
                                                                 file_ending=".png", rgb=rgb, seed=1))
    code, out = verify_cli(dataset, capsys)
    assert code == 0, out
    assert "OK (2 training cases" in out


# ------------------------------------------------------------------------------------------ one test per defect
def test_missing_channel_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    (dataset / "imagesTr" / "case_001_0001.nii.gz").unlink()
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    assert "[missing channel]" in out and "imagesTr/case_001_0001.nii.gz" in out
    assert "channel 1 ('MRI1')" in out


def test_unexpected_channel_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    (dataset / "imagesTr" / "case_000_0002.nii.gz").write_bytes((dataset / "imagesTr" / "case_000_0001.nii.gz").read_bytes())
    code, out = verify_cli(dataset, capsys)
    assert code == 1 and "[unexpected channel]" in out and "case_000_0002.nii.gz" in out


def test_image_without_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    (dataset / "labelsTr" / "case_002.nii.gz").unlink()
    edit_json(dataset, numTraining=2)
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    [problem] = problems_of(dataset, "image without label")
    assert problem.file == "labelsTr/case_002.nii.gz"
    assert "[image without label]" in out and "[numTraining]" not in out


def test_label_without_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    for channel in (0, 1):
        (dataset / "imagesTr" / f"case_002_{channel:04d}.nii.gz").unlink()
    code, out = verify_cli(dataset, capsys)
    assert code == 1 and "[label without image]" in out and "labelsTr/case_002.nii.gz" in out


def test_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    (dataset / "imagesTr" / "case_000_0000.nii.gz").write_bytes(b"\x1f\x8b truncated garbage")
    (dataset / "labelsTr" / "case_001.nii.gz").write_bytes(b"")
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    files = {p.file for p in problems_of(dataset, "unreadable file")}
    assert files == {"imagesTr/case_000_0000.nii.gz", "labelsTr/case_001.nii.gz"}
    assert "[unreadable file] 2 problems" in out


def test_shape_mismatch_between_label_and_channels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    label, geometry = read_segmentation(dataset / "labelsTr" / "case_001.nii.gz")
    cropped = Geometry(label[:, :, :-2].shape, geometry.spacing, geometry.origin, geometry.direction)
    write_segmentation(label[:, :, :-2], cropped, dataset / "labelsTr" / "case_001.nii.gz")
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    [problem] = problems_of(dataset, "shape mismatch")
    assert problem.file == "labelsTr/case_001.nii.gz"
    assert str(cropped.shape) in problem.found and str(geometry.shape) in problem.expected


@pytest.mark.parametrize("field_name", ["spacing", "origin", "direction"])
def test_geometry_mismatch_between_channels(tmp_path: Path, capsys: pytest.CaptureFixture[str], field_name: str) -> None:
    dataset = make_3d(tmp_path)
    path = dataset / "imagesTr" / "case_002_0001.nii.gz"
    image, geometry = read_image(path)
    changed = {
        "spacing": dict(spacing=(geometry.spacing[0] * 1.05, *geometry.spacing[1:])),
        "origin": dict(origin=(geometry.origin[0] + 2.0, *geometry.origin[1:])),
        "direction": dict(direction=tuple(np.eye(3).ravel().tolist())),
    }[field_name]
    write_image(image[0], Geometry(**{**geometry.__dict__, **changed}), path)
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    [problem] = problems_of(dataset, "geometry mismatch")
    assert problem.file == "imagesTr/case_002_0001.nii.gz" and problem.found.startswith(field_name)


def test_geometry_within_tolerance_is_accepted() -> None:
    base = Geometry((4, 5, 6), (2.0, 0.8, 0.8), (-100.0, 20.0, 3.0), tuple(np.eye(3).ravel().tolist()))
    near = Geometry((4, 5, 6), (2.0 * (1 + GEOMETRY_TOLERANCE / 10), 0.8, 0.8), (-100.0 + 1e-4, 20.0, 3.0),
                    base.direction)
    assert geometry_differences(base, near) == []
    far = Geometry((4, 5, 6), (2.0, 0.8, 0.8), (-100.0, 20.1, 3.0), base.direction)
    assert geometry_differences(base, far) == ["origin (-100, 20.1, 3) instead of (-100, 20, 3)"]


def test_undeclared_label_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    label, geometry = read_segmentation(dataset / "labelsTr" / "case_000.nii.gz")
    label[0, 0, :3] = 5
    write_segmentation(label, geometry, dataset / "labelsTr" / "case_000.nii.gz")
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    [problem] = problems_of(dataset, "undeclared label value")
    assert problem.file == "labelsTr/case_000.nii.gz" and problem.found == "undeclared value(s) 5 (3 voxels)"


def test_non_integer_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    path = dataset / "labelsTr" / "case_001.nii.gz"
    label, geometry = read_segmentation(path)
    soft = label.astype(np.float32)
    soft[soft == 1] = 0.5
    write_image(soft, geometry, path)  # write_image keeps float32
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    [problem] = problems_of(dataset, "non-integer label")
    assert problem.file == "labelsTr/case_001.nii.gz" and "0.5" in problem.found
    assert non_integer_values(np.array([0.0, 1.0, 2.0], np.float32)) == []
    assert non_integer_values(np.array([0, 1], np.uint8)) == []


def test_nan_and_inf_in_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    path = dataset / "imagesTr" / "case_000_0001.nii.gz"
    image, geometry = read_image(path)
    image[0, 0, 0, :2] = np.nan
    image[0, 1, 1, 1] = np.inf
    write_image(image[0], geometry, path)
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    [problem] = problems_of(dataset, "NaN/Inf in image")
    assert problem.file == "imagesTr/case_000_0001.nii.gz" and problem.found == "2 NaN and 1 Inf voxels"


def test_zero_spacing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = generate(tmp_path / "Dataset102_Nrrd", SyntheticSpec(num_cases=2, shape=(8, 10, 10), file_ending=".nrrd"))
    path = dataset / "imagesTr" / "case_001_0000.nrrd"
    image, _ = read_image(path)
    z, y, x = image.shape[1:]
    header = ("NRRD0004\ntype: float\ndimension: 3\n"
              f"sizes: {x} {y} {z}\nspace dimension: 3\nspace directions: (0,0,0) (0,0.8,0) (0,0,2.5)\n"
              "encoding: raw\nendian: little\n\n")
    path.write_bytes(header.encode() + image[0].astype("<f4").tobytes())
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    [problem] = problems_of(dataset, "spacing")
    assert problem.file == "imagesTr/case_001_0000.nrrd" and "zero spacing" in problem.found


def test_negative_or_zero_spacing_is_described() -> None:
    assert spacing_problem((2.0, 0.8, 0.8)) is None
    assert spacing_problem((2.0, -0.8, 0.8)) == "spacing (2.0, -0.8, 0.8) (axis 1 not > 0)"
    assert spacing_problem((0.0, 1.0)) == "spacing (0.0, 1.0) (axis 0 not > 0)"


def test_mixed_2d_and_3d(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    geometry = Geometry((10, 12), (0.8, 0.8), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    for channel in (0, 1):
        write_image(np.ones((10, 12), np.float32), geometry, dataset / "imagesTr" / f"case_001_{channel:04d}.nii.gz")
    write_segmentation(np.zeros((10, 12), np.uint8), geometry, dataset / "labelsTr" / "case_001.nii.gz")
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    [problem] = problems_of(dataset, "mixed 2D/3D")
    assert problem.file == "imagesTr/case_001_0000.nii.gz" and problem.found == "a 2D image"
    assert problem.expected.startswith("3D")


def test_num_training_disagrees_with_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    edit_json(dataset, numTraining=7)
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    [problem] = problems_of(dataset, "numTraining")
    assert problem.file == "dataset.json" and problem.found == "numTraining 7" and '"numTraining": 3' in problem.fix


def test_wrong_file_ending(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    image, geometry = read_image(dataset / "imagesTr" / "case_000_0000.nii.gz")
    write_image(image[0], geometry, dataset / "imagesTr" / "case_009_0000.nii")
    (dataset / "labelsTr" / "notes.txt").write_text("hello")
    (dataset / "imagesTr" / "._case_000_0000.nii.gz").write_bytes(b"macOS resource fork")  # ignored
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    problems = {p.file: p for p in problems_of(dataset, "file ending")}
    assert set(problems) == {"imagesTr/case_009_0000.nii", "labelsTr/notes.txt"}
    assert problems["imagesTr/case_009_0000.nii"].found == "'.nii'"
    assert "unreadable" not in out


def test_file_name_without_channel_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    (dataset / "imagesTr" / "case_000_0000.nii.gz").rename(dataset / "imagesTr" / "case_000.nii.gz")
    code, out = verify_cli(dataset, capsys)
    assert code == 1 and "[file name]" in out and "rename it to case_000_0000.nii.gz" in out


def test_empty_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    for path in [*dataset.glob("imagesTr/*"), *dataset.glob("labelsTr/*")]:
        path.unlink()
    code, out = verify_cli(dataset, capsys)
    assert code == 1 and "[empty dataset]" in out and "FAILED" in out.splitlines()[-1]


def test_missing_labels_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    for path in dataset.glob("labelsTr/*"):
        path.unlink()
    (dataset / "labelsTr").rmdir()
    code, out = verify_cli(dataset, capsys)
    assert code == 1 and "[folder layout]" in out and "labelsTr/" in out


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{not json", "invalid JSON at line 1"),
    (json.dumps({"modality": {"0": "MRI"}, "labels": {"0": "background"}}), "autoseg convert-msd"),
    (json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 2}, "file_ending": ".nii.gz"}),
     "consecutive"),
    (json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "file_ending": ".jpg"}), "'.jpg'"),
])
def test_dataset_json_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None,
                               message: str) -> None:
    dataset = make_3d(tmp_path)
    if content is None:
        (dataset / "dataset.json").unlink()
    else:
        (dataset / "dataset.json").write_text(content)
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    [problem] = problems_of(dataset, "dataset.json")
    assert problem.file == "dataset.json" and message in problem.found


# ------------------------------------------------------------------------------------------ colour channels
def _rgb_dataset(tmp_path: Path, channel_names: dict[str, str]) -> Path:
    dataset = generate(tmp_path / "Dataset103_Rgb", SyntheticSpec(num_cases=2, dims=2, shape=(12, 14), spacing=(1.0, 1.0),
                                                                 file_ending=".png", rgb=True, seed=2))
    edit_json(dataset, channel_names=channel_names)
    return dataset


def test_rgb_png_with_one_declared_channel_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = _rgb_dataset(tmp_path, {"0": "EM"})
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    problems = problems_of(dataset, "colour channels")
    assert [p.file for p in problems] == ["imagesTr/case_000_0000.png", "imagesTr/case_001_0000.png"]
    assert problems[0].found == "3 colour channels (RGB) in this file"
    assert "1 channel (EM)" in problems[0].expected and '"0": "R"' in problems[0].fix


def test_rgb_png_with_two_declared_channels_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = _rgb_dataset(tmp_path, {"0": "R", "1": "G"})
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    problems = problems_of(dataset, "colour channels")
    assert len(problems) == 2 and "2 channels (R, G)" in problems[0].expected
    # a single colour file stands for all channels, so no "missing channel" noise on top
    assert problems_of(dataset, "missing channel") == []


def test_grayscale_stored_as_rgb_is_recognised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = generate(tmp_path / "Dataset104_Gray", SyntheticSpec(num_cases=1, dims=2, shape=(12, 14), spacing=(1.0, 1.0),
                                                                  file_ending=".png", seed=4))
    path = dataset / "imagesTr" / "case_000_0000.png"
    gray = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([gray] * 3, -1), isVector=True), str(path))
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    [problem] = problems_of(dataset, "colour channels")
    assert "they are identical" in problem.found and problem.fix == "save the image as single-channel grayscale"


# ------------------------------------------------------------------------------------------ report and pool
def test_all_problems_reported_at_once_and_pool_agrees(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    (dataset / "imagesTr" / "case_001_0001.nii.gz").unlink()
    (dataset / "labelsTr" / "case_002.nii.gz").write_bytes(b"")
    edit_json(dataset, numTraining=4)
    serial = verify_dataset(dataset, num_workers=1)
    pooled = verify_dataset(dataset, num_workers=2)
    assert serial.problems == pooled.problems
    assert serial.checks_failed() == ["numTraining", "missing channel", "unreadable file"]
    text = serial.format()
    assert text.splitlines()[-1].startswith("Dataset100_Tiny: FAILED, 3 errors and 0 warnings")
    assert text.index("[numTraining]") < text.index("[missing channel]") < text.index("[unreadable file]")


def test_unused_label_is_only_a_warning(tmp_path: Path) -> None:
    dataset = make_3d(tmp_path)
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    edit_json(dataset, labels={**labels, "tumour": 3})
    report = verify_dataset(dataset, num_workers=1)
    assert report.ok
    [warning] = report.warnings
    assert warning.check == "unused label" and "'tumour' (3)" in warning.expected
    assert "1 warning" in report.summary()


# ------------------------------------------------------------------------------------------ issue 18 item 9
def test_an_ending_that_differs_only_in_letter_case_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    for channel in ("0000", "0001"):  # the case listing globs the exact ending: this case was silently dropped
        source = dataset / "imagesTr" / f"case_001_{channel}.nii.gz"
        source.rename(source.with_name(f"case_001_{channel}.NII.GZ"))
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    problems = problems_of(dataset, "file ending")
    assert [p.file for p in problems] == ["imagesTr/case_001_0000.NII.GZ", "imagesTr/case_001_0001.NII.GZ"]
    assert "'.NII.GZ'" in problems[0].found and problems[0].fix == "rename it to case_001_0000.nii.gz"


def test_case_ids_that_differ_only_in_letter_case_are_one_problem(tmp_path: Path) -> None:
    dataset = make_3d(tmp_path)
    for channel in ("0000", "0001"):
        source = dataset / "imagesTr" / f"case_002_{channel}.nii.gz"
        source.rename(source.with_name(f"Case_002_{channel}.nii.gz"))
    report = verify_dataset(dataset, num_workers=1)
    [problem] = [p for p in report.problems if p.check == "case id letter case"]
    assert "'Case_002', 'case_002'" in problem.found and "labelsTr/case_002.nii.gz" in problem.found
    assert not [p for p in report.problems if p.check in ("image without label", "label without image")]


def test_a_label_without_foreground_is_a_warning(tmp_path: Path) -> None:
    dataset = make_3d(tmp_path)
    path = dataset / "labelsTr" / "case_000.nii.gz"
    label, geometry = read_segmentation(path)
    write_segmentation(np.zeros_like(label), geometry, path)
    report = verify_dataset(dataset, num_workers=1)
    [problem] = [p for p in report.problems if p.check == "empty label"]
    assert problem.file == "labelsTr/case_000.nii.gz" and problem.severity == "warning"
    assert problem.found.startswith("label has no foreground") and report.ok


def test_a_0_255_mask_is_named_as_such(tmp_path: Path) -> None:
    dataset = generate(tmp_path / "Dataset104_Mask", SyntheticSpec(num_cases=2, shape=(8, 10, 10), seed=4))
    edit_json(dataset, labels={"background": 0, "lesion": 1})
    for path in sorted((dataset / "labelsTr").iterdir()):
        label, geometry = read_segmentation(path)
        write_segmentation(np.where(label > 0, 255, 0).astype(np.uint8), geometry, path)
    [problem, _] = problems_of(dataset, "undeclared label value")
    assert problem.found.startswith("labels are 0/255: a binary mask saved as 8-bit image")
    assert problem.fix.startswith("map 255 to 1")


def test_a_broken_dataset_json_still_lets_the_files_be_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = make_3d(tmp_path)
    (dataset / "dataset.json").write_text('{"channel_names": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz",')
    (dataset / "imagesTr" / "case_001_0001.nii.gz").unlink()
    path = dataset / "imagesTr" / "case_000_0000.nii.gz"
    path.write_bytes(path.read_bytes()[:100])
    code, out = verify_cli(dataset, capsys)
    assert code == 1
    checks = {p.check for p in verify_dataset(dataset, num_workers=1).problems}
    assert checks == {"dataset.json", "missing channel", "unreadable file"}, out
    assert "still checked, with file ending '.nii.gz' and 2 channel(s)" in out
