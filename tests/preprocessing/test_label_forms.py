"""Region and ignore-label datasets through fingerprint, planning and preprocessing (tiny, end to end)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.dataset.synthetic import SyntheticSpec, generate
from autoseg.pipeline import plan_dataset
from autoseg.contracts.plans import load_plans
from autoseg.preprocessing import load_case
from autoseg.preprocessing.case import sample_annotated_locations, sample_class_locations
from autoseg.preprocessing.store import CaseProperties

TINY = dict(num_cases=2, shape=(8, 20, 20), spacing=(2.0, 1.0, 1.0))


def _plan(root: Path, name: str, spec: SyntheticSpec):
    generate(root / "raw" / name, spec)
    plan_dataset(name, root=root, configurations=["3d_fullres"], num_workers=1, gpu_memory_gb=8)
    plans = load_plans(root / "preprocessed" / name / "plans.json")
    return plans, root / "preprocessed" / name / plans.configuration("3d_fullres").data_identifier


def test_sample_class_locations_per_region_and_by_value() -> None:
    label = np.zeros((1, 4, 4), np.int8)
    label[0, 0, :3] = [1, 2, 3]
    locations = sample_class_locations(label, [(1, 2, 3), (2, 3), 3], num_samples=100)
    assert sorted(map(tuple, locations["1,2,3"])) == [(0, 0, 0), (0, 0, 1), (0, 0, 2)]
    assert sorted(map(tuple, locations["2,3"])) == [(0, 0, 1), (0, 0, 2)]
    assert locations["3"] == [[0, 0, 2]]
    annotated = sample_annotated_locations(np.where(label == 3, 3, label), ignore_value=3, num_samples=100)
    assert len(annotated) == 15 and [0, 0, 2] not in annotated


def test_region_dataset_plans_and_preprocesses(tmp_path: Path) -> None:
    spec = SyntheticSpec(**TINY, channels=4, kind="regions", seed=4)
    plans, folder = _plan(tmp_path, "Dataset210_Regions", spec)
    scheme = plans.label_scheme  # read back from a sorted-keys plans.json: region order must survive
    assert scheme.output_names == ["whole", "core", "enhancing"] and plans.regions_class_order == [1, 2, 3]
    assert plans.num_classes == 3 and plans.num_channels == 4
    data, seg, properties = load_case(folder, "case_000")
    assert seg.dtype == np.int8 and set(np.unique(seg).tolist()) <= {0, 1, 2, 3}  # integers, not region masks
    assert set(properties.class_locations) == {"1,2,3", "2,3", "3"}
    for key, locations in properties.class_locations.items():
        values = [int(v) for v in key.split(",")]
        assert locations and all(seg[0][tuple(z)] in values for z in locations)
    assert properties.annotated_locations == []  # no ignore label: every voxel is annotated


def test_ignore_dataset_never_samples_ignore_and_stores_annotated_voxels(tmp_path: Path) -> None:
    spec = SyntheticSpec(**TINY, kind="sparse", seed=5)
    plans, folder = _plan(tmp_path, "Dataset211_Sparse", spec)
    assert plans.label_scheme.ignore_value == 3 and plans.num_classes == 3  # background, object, satellite
    _, seg, properties = load_case(folder, "case_000")
    assert set(properties.class_locations) == {"1", "2"}  # never "3"
    annotated = properties.annotated_locations
    assert annotated and all(seg[0][tuple(z)] != 3 for z in annotated)
    assert any(seg[0][tuple(z)] == 0 for z in annotated)  # annotated background counts too
    for key, locations in properties.class_locations.items():
        assert all(seg[0][tuple(z)] == int(key) for z in locations)


def test_case_json_without_annotated_locations_still_loads() -> None:
    properties = CaseProperties.from_json({
        "case_id": "c", "geometry": {"shape": [2, 2, 2], "spacing": [1, 1, 1], "origin": [0, 0, 0],
                                     "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]},
        "original_spacing": [1, 1, 1], "shape_before_crop": [2, 2, 2], "bbox": [[0, 2]] * 3,
        "shape_after_crop": [2, 2, 2], "spacing_after_resampling": [1, 1, 1], "shape_after_resampling": [2, 2, 2],
        "class_locations": {"1": [[0, 0, 0]]}, "schema_version": 1})
    assert properties.annotated_locations == [] and properties.class_locations == {"1": [[0, 0, 0]]}
