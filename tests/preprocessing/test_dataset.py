"""preprocess_dataset: output files, reruns, failures, interruption, and the CLI exit code."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autoseg.cli import main
from autoseg.dataset.synthetic import SyntheticSpec
from autoseg.errors import ConfigurationError
from autoseg.io import read_image, read_segmentation
from autoseg.preprocessing import is_complete, load_case, preprocess_case, preprocess_dataset

from .helpers import DATASET, make_configuration, make_dataset, make_plans

SMALL = SyntheticSpec(num_cases=4, shape=(10, 24, 24), spacing=(2.5, 0.8, 0.8), oblique=True, seed=5)


def _setup(root: Path, spec: SyntheticSpec = SMALL, target=(2.5, 0.8, 0.8)):
    configurations = [
        make_configuration("3d_fullres", target_spacing=target),
        make_configuration("3d_fullres_unetrpp", target_spacing=target, data_identifier="3d_fullres"),
    ]
    plans = make_plans(configurations)
    raw = make_dataset(root, spec, plans)
    return raw, plans, root / "preprocessed" / DATASET / "3d_fullres"


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_every_case_is_stored_and_equals_the_in_memory_path(tmp_path) -> None:
    raw, plans, folder = _setup(tmp_path)
    report = preprocess_dataset(DATASET, root=tmp_path, num_workers=2)  # spawn pool
    assert report.ok and report.failures == [] and report.processed == 4 and report.skipped == 0
    # both configurations share one data identifier: one folder, each case once
    # (the stage lock file stays, see autoseg.locks)
    assert sorted(p.name for p in (tmp_path / "preprocessed" / DATASET).iterdir()) == [".preprocessed.lock", "3d_fullres", "plans.json"]
    assert len(list(folder.glob("*.json"))) == 4 and not list(folder.glob(".*"))

    image, geometry = read_image(sorted((raw / "imagesTr").glob("case_002_*")))
    label, _ = read_segmentation(raw / "labelsTr" / "case_002.nii.gz")
    expected = preprocess_case(image, geometry, plans, plans.configuration("3d_fullres"), label, "case_002")
    data, stored, properties = load_case(folder, "case_002")
    np.testing.assert_array_equal(data, expected[0])
    np.testing.assert_array_equal(stored, expected[1])
    assert properties.provenance is not None  # the store adds what the case was made from
    properties.provenance = None
    assert properties == expected[2]


def test_rerun_skips_complete_cases_and_redoes_a_truncated_one(tmp_path) -> None:
    _, _, folder = _setup(tmp_path)
    assert preprocess_dataset(DATASET, root=tmp_path, num_workers=1).ok
    before = _file_bytes(folder)
    victim = folder / "case_001.b2nd"  # the default array format
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a half-written array
    assert not is_complete(folder, "case_001")
    untouched = folder / "case_003.b2nd"
    stamp = untouched.stat().st_mtime_ns

    report = preprocess_dataset(DATASET, configurations=["3d_fullres"], root=tmp_path, num_workers=1)
    assert report.ok and report.processed == 1 and report.skipped == 3
    assert untouched.stat().st_mtime_ns == stamp
    assert _file_bytes(folder) == before


def test_a_corrupted_case_is_reported_and_the_others_finish(tmp_path, capsys) -> None:
    raw, _, folder = _setup(tmp_path)
    broken = raw / "imagesTr" / "case_002_0000.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file")
    report = preprocess_dataset(DATASET, root=tmp_path, num_workers=1)
    assert not report.ok
    assert [case for case, _ in report.failures] == ["case_002"]
    assert "case_002_0000.nii.gz" in report.failures[0][1]
    assert [c for c in ("case_000", "case_001", "case_003") if is_complete(folder, c)] == ["case_000", "case_001", "case_003"]
    assert not (folder / "case_002.json").exists()

    assert main(["preprocess", DATASET, "--root", str(tmp_path), "-np", "1"]) == 1
    assert "case_002_0000.nii.gz" in capsys.readouterr().out


def test_missing_plans_and_unknown_configuration_are_user_errors(tmp_path) -> None:
    _setup(tmp_path)
    with pytest.raises(ConfigurationError, match="no configuration '3d_lowres'"):
        preprocess_dataset(DATASET, configurations=["3d_lowres"], root=tmp_path)
    (tmp_path / "preprocessed" / DATASET / "plans.json").unlink()
    with pytest.raises(ConfigurationError, match="run `autoseg plan"):
        preprocess_dataset(DATASET, root=tmp_path)
    assert main(["preprocess", DATASET, "--root", str(tmp_path)]) == 1


_RUN = "import sys; from autoseg.preprocessing import preprocess_dataset; preprocess_dataset({!r}, root=sys.argv[1], num_workers=1)"


@pytest.mark.slow
def test_killed_run_resumes_to_byte_identical_outputs(tmp_path) -> None:
    spec = SyntheticSpec(num_cases=8, shape=(16, 48, 48), spacing=(2.5, 0.8, 0.8), oblique=True, seed=7)
    target = (1.25, 0.4, 0.4)  # upsampling: a few hundred ms per case, long enough to be killed in the middle
    _, _, reference_folder = _setup(tmp_path / "reference", spec, target)
    assert preprocess_dataset(DATASET, root=tmp_path / "reference", num_workers=1).ok

    root = tmp_path / "interrupted"
    _, _, folder = _setup(root, spec, target)
    process = subprocess.Popen(
        [sys.executable, "-c", _RUN.format(DATASET), str(root)],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(folder.glob("case_*.json")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the run and nothing else
    finally:
        process.wait()
    done_at_kill = len(list(folder.glob("case_*.json")))
    assert 1 <= done_at_kill < 8, "the run was not interrupted in the middle"

    report = preprocess_dataset(DATASET, root=root, num_workers=1)
    assert report.ok and report.skipped == done_at_kill
    assert _file_bytes(folder) == _file_bytes(reference_folder)


def test_preprocessing_does_not_import_torch():
    # every spawned preprocessing worker imports this package: torch would cost each ~1.6 s of start-up
    import subprocess
    import sys

    code = "import sys, autoseg.preprocessing; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_case_peak_estimate_by_hand() -> None:
    from autoseg.preprocessing.dataset import estimate_case_peak_bytes

    # no crop, no resampling, 1 channel: image (read + crop + 2 resampled) + label (read + crop + 3) = 9 copies
    assert estimate_case_peak_bytes((10, 20, 30), (10, 20, 30), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 1) == 4 * 9 * 6000
    # resampling to half the spacing on every axis: 8x the voxels after resampling; 2 channels
    read, cropped = 6000, 3000
    resampled = 8 * cropped
    expected = 4 * (2 * (read + cropped + 2 * resampled) + read + cropped + 3 * resampled)
    assert estimate_case_peak_bytes((10, 20, 30), (10, 10, 30), (2.0, 2.0, 2.0), (1.0, 1.0, 1.0), 2) == expected
    # a 2D configuration resamples only the in-plane axes of 3D images: 4x the voxels, Z (5 mm) untouched
    resampled = 4 * 6000
    assert estimate_case_peak_bytes((10, 20, 30), (10, 20, 30), (5.0, 1.0, 1.0), (0.5, 0.5), 1) == \
        4 * ((6000 + 6000 + 2 * resampled) + (6000 + 6000 + 3 * resampled))


def test_workers_capped_by_free_memory() -> None:
    from autoseg.preprocessing.dataset import MEMORY_FRACTION, workers_for_memory

    gb = 10**9
    assert workers_for_memory(8, None, 4 * gb) == 8  # memory unknown: the cores decide
    assert workers_for_memory(8, int(100 * gb / MEMORY_FRACTION), 4 * gb) == 8  # room for 25: cores decide
    assert workers_for_memory(8, int(10 * gb / MEMORY_FRACTION), 4 * gb) == 2  # room for 2.5 cases
    assert workers_for_memory(8, 1 * gb, 40 * gb) == 1  # never fewer than one: the case has to run


def test_auto_workers_logs_the_choice(tmp_path, caplog, monkeypatch) -> None:
    import logging

    import autoseg.preprocessing.dataset as dataset_module
    from autoseg.contracts.fingerprint import FINGERPRINT_FILE

    _, plans, folder = _setup(tmp_path)
    fingerprint = {"cases": [{"shape_before_crop": [16, 48, 48], "shape_after_crop": [16, 40, 40]}],
                   "median_spacing": [2.5, 0.8, 0.8]}
    monkeypatch.setattr("autoseg.contracts.fingerprint.load_fingerprint", lambda path: _Fingerprint(**fingerprint))
    (folder.parent / FINGERPRINT_FILE).write_text("{}")
    monkeypatch.setattr(dataset_module, "available_memory_bytes", lambda: 18_300_000_000)
    configuration = plans.configuration("3d_fullres")
    with caplog.at_level(logging.INFO, logger="autoseg.preprocessing.dataset"):
        workers = dataset_module._auto_workers(folder.parent, configuration, 1)
    assert workers == min(dataset_module.MAX_AUTO_WORKERS, os.cpu_count() or 1)  # tiny cases: cores decide
    assert f"{workers} worker(s) (free RAM 18.3 GB, ~0.0 GB per case)" in caplog.text


class _Case:
    def __init__(self, shape_before_crop, shape_after_crop):
        self.shape_before_crop, self.shape_after_crop = shape_before_crop, shape_after_crop


class _Fingerprint:
    def __init__(self, cases, median_spacing):
        self.cases = [_Case(**c) for c in cases]
        self.median_spacing = median_spacing
