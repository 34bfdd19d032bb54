import json

import pytest

from autoseg.contracts.plans import load_plans
from autoseg.dataset.synthetic import SyntheticSpec, generate
from autoseg.errors import DatasetError
from autoseg.pipeline import plan_dataset


def make_raw(root, name="Dataset903_Plan", **kwargs):
    spec = dict(num_cases=6, shape=(8, 24, 24), spacing=(2.5, 1.0, 1.0))
    spec.update(kwargs)
    return generate(root / "raw" / name, SyntheticSpec(**spec))


def test_plan_dataset_writes_fingerprint_plans_splits_and_prints_a_table(tmp_path, capsys):
    make_raw(tmp_path)
    plans = plan_dataset("903", root=tmp_path, architectures=["unet"], preprocess=False, num_workers=1)
    folder = tmp_path / "preprocessed" / "Dataset903_Plan"
    assert load_plans(folder / "plans.json") == plans
    fingerprint = json.loads((folder / "fingerprint.json").read_text())
    assert len(fingerprint["cases"]) == 6
    splits = json.loads((folder / "splits.json").read_text())
    assert len(splits) == 5 and sorted(c for f in splits for c in f["val"]) == [f"case_{i:03d}" for i in range(6)]
    out = capsys.readouterr().out
    assert "3d_fullres" in out and "memory (GB)" in out

    # re-planning keeps hand-edited splits and rewrites fingerprint.json identically
    before = (folder / "fingerprint.json").read_bytes()
    (folder / "splits.json").write_text(json.dumps(splits[:2]))
    plan_dataset("Plan", root=tmp_path, architectures=["unet"], configurations=["3d_fullres"], preprocess=False,
                 num_workers=1, show_summary=False)
    assert json.loads((folder / "splits.json").read_text()) == splits[:2]
    assert (folder / "fingerprint.json").read_bytes() == before
    assert list(load_plans(folder / "plans.json").configurations) == ["3d_fullres"]


def test_a_dataset_that_fails_verify_is_not_planned(tmp_path):
    raw = make_raw(tmp_path, name="Dataset904_Broken", num_cases=3)
    next((raw / "imagesTr").glob("case_001_0000*")).unlink()  # a label without its image
    with pytest.raises(DatasetError, match="does not verify"):
        plan_dataset("904", root=tmp_path, preprocess=False, num_workers=1)
    assert not (tmp_path / "preprocessed" / "Dataset904_Broken" / "plans.json").exists()


def _triple_z_spacing(raw):
    import SimpleITK as sitk

    for path in sorted(raw.glob("*Tr/*.nii.gz")):
        image = sitk.ReadImage(str(path))
        spacing = list(image.GetSpacing())  # ITK order: x, y, z
        image.SetSpacing([spacing[0], spacing[1], 3 * spacing[2]])
        sitk.WriteImage(image, str(path), True)


def test_replanning_after_the_raw_spacing_changed_redoes_the_preprocessed_cases(tmp_path):
    # issue 18: every raw file's z-spacing tripled, `autoseg plan` rerun -> "0 case(s) to preprocess" and the
    # stored cases kept the old spacing while plans.json had the new one
    from autoseg.preprocessing import load_case

    raw = make_raw(tmp_path, name="Dataset905_Stale", num_cases=4, shape=(6, 16, 16))
    kwargs = dict(root=tmp_path, architectures=["unet"], configurations=["3d_fullres"], num_workers=1,
                  show_summary=False)
    first = plan_dataset("905", **kwargs)
    _triple_z_spacing(raw)
    second = plan_dataset("905", **kwargs)
    old_z = first.configuration("3d_fullres").target_spacing[0]
    new_spacing = second.configuration("3d_fullres").target_spacing
    assert new_spacing[0] == pytest.approx(3 * old_z)
    folder = tmp_path / "preprocessed" / "Dataset905_Stale" / "3d_fullres"
    for case in ("case_000", "case_001", "case_002", "case_003"):
        assert load_case(folder, case)[2].spacing_after_resampling == pytest.approx(new_spacing)


def test_a_concurrent_plan_is_refused_naming_the_other_process(tmp_path):
    import subprocess
    import sys

    from autoseg.errors import BusyError

    make_raw(tmp_path, name="Dataset906_Busy", num_cases=3)
    folder = tmp_path / "preprocessed" / "Dataset906_Busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom autoseg.locks import stage_lock\n"
         "with stage_lock(sys.argv[1], 'preprocessed'):\n    print('held', flush=True)\n    time.sleep(60)",
         str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=f"being preprocessed by pid {holder.pid} "):
            plan_dataset("906", root=tmp_path, num_workers=1, show_summary=False)
    finally:
        holder.kill()
        holder.wait()
    assert not (folder / "plans.json").exists()
    plan_dataset("906", root=tmp_path, num_workers=1, show_summary=False, preprocess=False)  # free again
    assert (folder / "plans.json").exists()
