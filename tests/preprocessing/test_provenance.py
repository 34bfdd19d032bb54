"""Stale preprocessed data is redone: each stored case records the digests of its input files and of the plan
entries that shape it (issue 18 item 1); reruns skip only cases that are complete *and* current."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.cli import main
from autoseg.contracts.plans import save_plans
from autoseg.dataset.synthetic import SyntheticSpec
from autoseg.preprocessing import is_complete, load_case, preprocess_dataset
from autoseg.preprocessing.dataset import plan_digest
from autoseg.preprocessing.store import case_provenance, input_record

from .helpers import DATASET, make_configuration, make_dataset, make_plans

SPEC = SyntheticSpec(num_cases=3, shape=(8, 20, 20), spacing=(2.5, 0.8, 0.8), seed=3)


def _setup(root: Path, target=(2.5, 0.8, 0.8)):
    plans = make_plans([make_configuration("3d_fullres", target_spacing=target)])
    raw = make_dataset(root, SPEC, plans)
    return raw, plans, root / "preprocessed" / DATASET / "3d_fullres"


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_unchanged_inputs_are_skipped_and_the_record_names_every_input(tmp_path) -> None:
    raw, plans, folder = _setup(tmp_path)
    assert preprocess_dataset(DATASET, root=tmp_path, num_workers=1).processed == 3
    stamps = _mtimes(folder)
    report = preprocess_dataset(DATASET, root=tmp_path, num_workers=1)
    assert report.ok and report.processed == 0 and report.skipped == 3
    assert _mtimes(folder) == stamps
    _, _, properties = load_case(folder, "case_001")
    files = [raw / "imagesTr" / "case_001_0000.nii.gz", raw / "labelsTr" / "case_001.nii.gz"]
    assert properties.provenance == case_provenance(input_record(files), plan_digest(plans, plans.configuration("3d_fullres")))
    assert [name for name, _ in properties.provenance["inputs"]] == ["case_001_0000.nii.gz", "case_001.nii.gz"]


def test_a_label_edited_in_place_with_its_mtime_kept_is_redone(tmp_path) -> None:
    raw, _, folder = _setup(tmp_path)
    assert preprocess_dataset(DATASET, root=tmp_path, num_workers=1).ok
    label_file = raw / "labelsTr" / "case_002.nii.gz"
    stat = label_file.stat()
    image = sitk.ReadImage(str(label_file))
    array = sitk.GetArrayFromImage(image)
    assert (array == 1).any()
    array[array == 1] = 2  # the annotator changed a class
    edited = sitk.GetImageFromArray(array)
    edited.CopyInformation(image)
    sitk.WriteImage(edited, str(label_file), True)
    os.utime(label_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or a restore would leave it

    report = preprocess_dataset(DATASET, root=tmp_path, num_workers=1)
    assert report.ok and report.processed == 1 and report.skipped == 2
    _, label, _ = load_case(folder, "case_002", mmap=False)
    assert not (label == 1).any() and (label == 2).any()


def test_a_changed_target_spacing_redoes_every_case_at_the_new_spacing(tmp_path) -> None:
    _, plans, folder = _setup(tmp_path)
    assert preprocess_dataset(DATASET, root=tmp_path, num_workers=1).ok
    plans.configurations["3d_fullres"].target_spacing = [7.5, 0.8, 0.8]  # as a re-plan of tripled z-spacing
    save_plans(plans, tmp_path / "preprocessed" / DATASET / "plans.json")
    report = preprocess_dataset(DATASET, root=tmp_path, num_workers=1)
    assert report.ok and report.processed == 3 and report.skipped == 0
    for case_id in ("case_000", "case_001", "case_002"):
        data, _, properties = load_case(folder, case_id)
        assert properties.spacing_after_resampling == [7.5, 0.8, 0.8]
        assert list(data.shape[1:]) == properties.shape_after_resampling


def test_patch_size_alone_does_not_make_cases_stale(tmp_path) -> None:
    # the patch shapes only the b2nd chunks, not a stored value: no reason to redo hours of preprocessing
    _, plans, _ = _setup(tmp_path)
    assert preprocess_dataset(DATASET, root=tmp_path, num_workers=1).ok
    plans.configurations["3d_fullres"].patch_size = [8, 8, 8]
    save_plans(plans, tmp_path / "preprocessed" / DATASET / "plans.json")
    assert preprocess_dataset(DATASET, root=tmp_path, num_workers=1).skipped == 3


def test_a_case_json_without_provenance_is_redone_and_still_loads(tmp_path) -> None:
    _, _, folder = _setup(tmp_path)
    assert preprocess_dataset(DATASET, root=tmp_path, num_workers=1).ok
    path = folder / "case_000.json"
    data = json.loads(path.read_text())
    del data["provenance"]  # a store written before the field existed
    path.write_text(json.dumps(data))
    assert is_complete(folder, "case_000") and load_case(folder, "case_000")[2].provenance is None
    report = preprocess_dataset(DATASET, root=tmp_path, num_workers=1)
    assert report.processed == 1 and report.skipped == 2
    assert load_case(folder, "case_000")[2].provenance is not None


def test_force_redoes_current_cases(tmp_path, capsys) -> None:
    _, _, folder = _setup(tmp_path)
    assert preprocess_dataset(DATASET, root=tmp_path, num_workers=1).ok
    before = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    stamps = _mtimes(folder)
    assert main(["preprocess", DATASET, "--root", str(tmp_path), "-np", "1", "--force"]) == 0
    assert "preprocessed 3 case(s), skipped 0" in capsys.readouterr().out
    assert all(_mtimes(folder)[name] != stamp for name, stamp in stamps.items() if not name.startswith("."))
    assert {p.name: p.read_bytes() for p in sorted(folder.iterdir())} == before  # deterministic: same bytes


def test_a_second_run_is_refused_and_does_not_touch_the_first_runs_temp_files(tmp_path) -> None:
    # issue 18: two concurrent runs deleted each other's temp files (FileNotFoundError ... .partial.npy)
    import subprocess
    import sys

    import pytest

    from autoseg.errors import BusyError

    _, _, folder = _setup(tmp_path)
    folder.mkdir(parents=True)
    in_flight = folder / ".case_000.b2nd.abc123.partial.b2nd"  # what the running process is writing
    in_flight.write_bytes(b"half")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom autoseg.locks import stage_lock\n"
         "with stage_lock(sys.argv[1], 'preprocessed'):\n    print('held', flush=True)\n    time.sleep(60)",
         str(folder.parent)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=f"by pid {holder.pid} on host"):
            preprocess_dataset(DATASET, root=tmp_path, num_workers=1)
        assert in_flight.exists()
        assert main(["preprocess", DATASET, "--root", str(tmp_path), "-np", "1"]) == 1
    finally:
        holder.kill()  # like kill -9: the lock goes with the process, the temp file stays behind
        holder.wait()
    report = preprocess_dataset(DATASET, root=tmp_path, num_workers=1)
    assert report.ok and report.processed == 3
    assert not list(folder.glob(".*.partial*"))  # the killed run's leftovers, removed under the lock
