import numpy as np
import pytest

from autoseg.contracts.fingerprint import load_fingerprint, save_fingerprint
from autoseg.dataset.synthetic import SyntheticSpec, generate
from autoseg.planning.fingerprint import (
    extract_fingerprint,
    intensity_statistics,
    nonzero_bounding_box,
    sample_foreground,
)


def test_bounding_box_fills_holes_and_uses_any_channel():
    image = np.zeros((2, 10, 12), np.float32)
    image[0, 2:8, 3:9] = 1.0
    image[0, 4:6, 5:7] = 0.0  # a hole: stays inside
    image[1, 9, 11] = 5.0  # only channel 1 is nonzero here
    assert nonzero_bounding_box(image) == [(2, 10), (3, 12)]
    assert nonzero_bounding_box(np.zeros((1, 4, 5))) == [(0, 4), (0, 5)]


def test_intensity_statistics_match_numpy():
    values = np.arange(1001, dtype=np.float32)
    stats = intensity_statistics(values)
    assert stats.mean == pytest.approx(500.0) and stats.median == pytest.approx(500.0)
    assert stats.percentile_00_5 == pytest.approx(5.0) and stats.percentile_99_5 == pytest.approx(995.0)
    assert stats.min == 0.0 and stats.max == 1000.0 and stats.std == pytest.approx(np.std(values), rel=1e-6)


def test_foreground_samples_are_seeded_and_only_foreground():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 20, 20)).astype(np.float32)
    label = np.zeros((20, 20), np.uint8)
    label[5:10, 5:10] = 1
    image[:, label == 0] = 1e6  # any background sample would show
    a = sample_foreground(image, label, 300, (1, 0))
    assert a.shape == (2, 300) and np.all(a < 1e5)
    assert np.array_equal(a, sample_foreground(image, label, 300, (1, 0)))
    assert not np.array_equal(a, sample_foreground(image, label, 300, (1, 1)))
    assert sample_foreground(image, np.zeros_like(label), 300, (1, 0)).shape == (2, 0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "Dataset901_Tiny"
    return generate(out, SyntheticSpec(num_cases=4, shape=(8, 20, 20), spacing=(3.0, 1.0, 1.0), modality="CT"))


def test_fingerprint_of_a_tiny_dataset(dataset, tmp_path):
    fp = extract_fingerprint(dataset, num_workers=1, progress=False)
    assert fp.num_cases == 4 and fp.dims == 3 and fp.channel_names == {"0": "CT"}
    for case in fp.cases:
        assert len(case.spacing) == 3 and case.spacing[0] == pytest.approx(3.0, rel=0.11)
        assert all(a <= b for a, b in zip(case.shape_after_crop, case.shape_before_crop))
        assert sum(case.label_voxels.values()) == int(np.prod(case.shape_before_crop))
    assert fp.median_spacing == pytest.approx(np.median(fp.spacings, axis=0).tolist())
    # CT foreground: objects at 160 HU and -40 HU (synthetic.py), so the pooled range spans both
    stats = fp.intensity_stats["0"]
    assert stats.percentile_00_5 < 0 < 100 < stats.percentile_99_5
    assert set(fp.label_volume_median_mm3) == {"0", "1", "2"}
    save_fingerprint(fp, tmp_path / "fingerprint.json")
    assert load_fingerprint(tmp_path / "fingerprint.json") == fp


def test_fingerprint_is_byte_identical_across_runs_and_worker_counts(dataset, tmp_path):
    save_fingerprint(extract_fingerprint(dataset, num_workers=1, progress=False), tmp_path / "a.json")
    save_fingerprint(extract_fingerprint(dataset, num_workers=2, progress=False), tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_2d_png_fingerprint_has_two_axes(tmp_path):
    out = generate(tmp_path / "Dataset902_Png", SyntheticSpec(num_cases=3, dims=2, shape=(30, 40),
                                                             spacing=(1.0, 1.0), file_ending=".png", rgb=True))
    fp = extract_fingerprint(out, num_workers=1, progress=False)
    assert fp.dims == 2 and fp.cases[0].spacing == [1.0, 1.0]
    assert set(fp.intensity_stats) == {"0", "1", "2"}  # one colour PNG = three channels
