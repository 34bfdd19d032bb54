import json

import pytest

from autoseg.contracts.splits import SPLITS_FILE, fold_cases, load_splits
from autoseg.errors import ConfigurationError
from autoseg.planning.splits import create_splits, make_splits

IDS = [f"case_{i:03d}" for i in range(12)]


def test_five_folds_partition_the_cases():
    splits = make_splits(IDS)
    assert len(splits) == 5
    vals = [c for fold in splits for c in fold["val"]]
    assert sorted(vals) == IDS  # every case validated exactly once
    assert [len(f["val"]) for f in splits] == [3, 3, 2, 2, 2]  # first n % 5 folds one larger
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == IDS and not set(fold["train"]) & set(fold["val"])


def test_splits_are_deterministic_and_independent_of_input_order():
    assert make_splits(IDS) == make_splits(list(reversed(IDS)))
    assert make_splits(IDS) != make_splits(IDS, seed=1)


def test_splits_match_numpy_kfold_shuffle():
    # KFold(shuffle, random_state=12345): permute indices with RandomState(12345), contiguous chunks
    import numpy as np

    order = np.arange(12)
    np.random.RandomState(12345).shuffle(order)
    assert make_splits(IDS)[0]["val"] == sorted(IDS[i] for i in order[:3])


def test_existing_splits_are_never_overwritten(tmp_path, caplog):
    create_splits(tmp_path, IDS)
    edited = [{"train": IDS[1:], "val": IDS[:1]}]
    (tmp_path / SPLITS_FILE).write_text(json.dumps(edited))
    assert create_splits(tmp_path, IDS + ["case_999"]) == edited
    assert json.loads((tmp_path / SPLITS_FILE).read_text()) == edited
    assert "kept the existing splits" in caplog.text


def test_fewer_than_five_cases_give_leave_one_out_with_a_message(tmp_path, caplog):
    splits = create_splits(tmp_path, IDS[:3])
    assert len(splits) == 3 and all(len(f["val"]) == 1 for f in splits)
    assert "leave-one-out" in caplog.text and "'all'" in caplog.text


def test_fold_cases_and_the_all_fold(tmp_path):
    create_splits(tmp_path, IDS)
    train, val = fold_cases(tmp_path, 2)
    assert (train, val) == (load_splits(tmp_path)[2]["train"], load_splits(tmp_path)[2]["val"])
    assert fold_cases(tmp_path, "all") == (IDS, IDS)
    with pytest.raises(ConfigurationError,
                       match=r"splits.json: fold 5 does not exist; expected 0-4 or .all. \(splits.json lists 5 folds\)"):
        fold_cases(tmp_path, 5)


def test_broken_or_missing_splits_are_user_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="run `autoseg plan"):
        load_splits(tmp_path)
    (tmp_path / SPLITS_FILE).write_text('{"train": []}')
    with pytest.raises(ConfigurationError, match="expected a list"):
        load_splits(tmp_path)
