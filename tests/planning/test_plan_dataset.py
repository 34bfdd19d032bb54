import json

import pytest

from autoseg.dataset.synthetic import SyntheticSpec, generate
from autoseg.errors import DatasetError
from autoseg.planning import plan_dataset
from autoseg.planning.plans import load_plans


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
