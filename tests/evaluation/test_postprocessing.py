"""Largest-component postprocessing: chosen when a spurious blob hurts Dice, refused when a second component
is real, and stored/loaded as JSON."""
from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg.contracts.postprocessing import (
    PostprocessingRules,
    apply_postprocessing,
    largest_component,
    load_postprocessing,
    save_postprocessing,
)
from autoseg.errors import ConfigurationError
from autoseg.evaluation.postprocessing import candidate_dice, choose_rules, decide_postprocessing
from autoseg.io import Geometry, write_segmentation

SHAPE = (16, 24, 24)
GEOMETRY = Geometry(SHAPE, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))


def _reference(touching: bool = True) -> np.ndarray:
    seg = np.zeros(SHAPE, np.uint8)
    seg[4:12, 6:14, 6:12] = 1
    if touching:
        seg[5:11, 8:12, 12:16] = 2  # satellite touching the object, as in the synthetic dataset
    else:
        seg[5:11, 8:12, 16:20] = 2  # a separate organ
    return seg


def _with_blob(seg: np.ndarray, label: int) -> np.ndarray:
    out = seg.copy()
    out[13:16, 0:3, 20:24] = label  # far away in a corner
    return out


def test_largest_component_full_connectivity():
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal contact: one component
    mask[3:5, 3:5] = True  # 4 voxels: the largest
    assert largest_component(mask).sum() == 4
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()


def test_spurious_blob_is_removed_and_rule_chosen(tmp_path):
    pairs = []
    for index in range(4):
        reference = _reference()
        prediction = _with_blob(reference, 1) if index < 3 else reference.copy()
        write_segmentation(reference, GEOMETRY, tmp_path / "ref" / f"c{index}.nii.gz")
        write_segmentation(prediction, GEOMETRY, tmp_path / "pred" / f"c{index}.nii.gz")
        pairs.append((tmp_path / "pred" / f"c{index}.nii.gz", tmp_path / "ref" / f"c{index}.nii.gz"))
    rules = decide_postprocessing(pairs, labels=[1, 2], num_workers=1)
    assert rules.foreground_largest_component
    assert rules.largest_component_labels == []  # nothing left to gain once the blob is gone
    assert rules.dice_before["1"] < rules.dice_after["1"] == pytest.approx(1.0)
    assert rules.num_cases == 4
    fixed = apply_postprocessing(_with_blob(_reference(), 1), rules)
    np.testing.assert_array_equal(fixed, _reference())


def test_real_second_component_is_left_alone():
    reference = _reference(touching=False)
    reference[4:12, 6:14, 18:22] = 1  # a second, real object-1 component (think: two kidneys)
    prediction = reference.copy()
    prediction[4, 6:14, 6:12] = 0  # imperfect but honest prediction
    per_case = [candidate_dice(reference, prediction, [1, 2]) for _ in range(3)]
    rules = choose_rules(per_case, [1, 2])
    assert not rules.changes_anything
    np.testing.assert_array_equal(apply_postprocessing(prediction, rules), prediction)


def test_per_label_rule_when_all_foreground_would_hurt():
    reference = _reference(touching=False)  # two separate organs: all-foreground LCC would delete one
    prediction = _with_blob(reference, 2)
    rules = choose_rules([candidate_dice(reference, prediction, [1, 2])], [1, 2])
    assert not rules.foreground_largest_component
    assert rules.largest_component_labels == [2]
    np.testing.assert_array_equal(apply_postprocessing(prediction, rules), reference)
    assert apply_postprocessing(prediction, rules).dtype == prediction.dtype


def test_save_and_load_roundtrip(tmp_path):
    assert load_postprocessing(tmp_path) is None
    rules = PostprocessingRules(True, [2], [1, 2], {"1": 0.5, "2": 0.6}, {"1": 0.7, "2": 0.8}, 10)
    path = save_postprocessing(tmp_path, rules)
    assert path == tmp_path / "postprocessing.json"
    assert json.loads(path.read_text())["schema_version"] == 1
    assert load_postprocessing(tmp_path) == rules
    assert load_postprocessing(path) == rules
    path.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ConfigurationError, match="schema_version"):
        load_postprocessing(tmp_path)
