"""The coarse axis goes first: the transposition rule, its storage in plans.json, and plans that do not
depend on how the raw arrays happen to be ordered (docs/planning.md, "The coarse axis")."""
from __future__ import annotations

import json

import pytest

from autoseg.contracts.plans import Plans, inverse_permutation, load_plans, save_plans
from autoseg.errors import ConfigurationError
from autoseg.planning.planner import format_plans_table, plan_from_fingerprint
from autoseg.planning.spacing import coarse_axis_first
from tests.planning.helpers import crafted_fingerprint, uniform

CONFIGS = ["2d", "3d_fullres"]


@pytest.mark.parametrize(
    "spacing, expected",
    [
        ((0.8, 0.8, 5.0), [2, 0, 1]),  # sagittal/coronal stack: x is the thick axis
        ((0.8, 5.0, 0.8), [1, 0, 2]),  # the other two keep their order
        ((5.0, 0.8, 0.8), [0, 1, 2]),  # already first
        ((1.16, 1.22, 1.19), [0, 1, 2]),  # near-isotropic: nnU-Net would give [1, 0, 2]; we leave it
        ((0.8, 0.8, 2.4), [0, 1, 2]),  # exactly 3x is not "more than 3x"
        ((0.8, 0.8, 2.41), [2, 0, 1]),
        ((5.0, 0.8, 5.0), [0, 1, 2]),  # ties: the first coarse axis, already in front
        ((0.7, 0.7), [0, 1]),  # 2D data is never transposed
        ((0.1, 2.0), [0, 1]),
    ],
)
def test_coarse_axis_first(spacing, expected):
    assert coarse_axis_first(spacing) == expected


def test_inverse_permutation():
    assert inverse_permutation([2, 0, 1]) == [1, 2, 0]
    assert inverse_permutation([1, 0, 2]) == [1, 0, 2]
    values = ["z", "y", "x"]
    forward = [2, 0, 1]
    moved = [values[a] for a in forward]
    assert [moved[a] for a in inverse_permutation(forward)] == values
    with pytest.raises(ValueError, match="not a permutation"):
        inverse_permutation([0, 0, 1])


def _plans(spacing, shape, **kwargs):
    spacings, shapes = uniform(6, spacing, shape, jitter=0.0)
    return plan_from_fingerprint(crafted_fingerprint(spacings, shapes), configurations=CONFIGS,
                                 architectures=["unet"], **kwargs)


@pytest.fixture(scope="module")
def coarse_last():
    return _plans((0.8, 0.8, 5.0), (300, 300, 40))


@pytest.fixture(scope="module")
def coarse_first():
    return _plans((5.0, 0.8, 0.8), (40, 300, 300))


def test_coarse_last_is_transposed(coarse_last):
    assert coarse_last.transpose_forward == [2, 0, 1]
    assert coarse_last.transpose_backward == [1, 2, 0]
    # dataset-level medians stay in the raw files' order, as in fingerprint.json
    assert coarse_last.median_spacing == pytest.approx([0.8, 0.8, 5.0])


def test_fullres_works_in_the_transposed_order(coarse_last):
    full = coarse_last.configurations["3d_fullres"]
    assert full.target_spacing == pytest.approx([5.0, 0.8, 0.8])
    assert full.median_shape == pytest.approx([40, 300, 300])
    assert full.resampling.coarse_axis == 0 and full.resampling.separate_z is True
    strides, kernels = full.architecture.strides, full.architecture.kernel_sizes
    # the thick axis is neither convolved across nor pooled until the in-plane axes have caught up
    assert kernels[0][0] == 1 and kernels[0][1:] == [3, 3]
    assert strides[1] == [1, 2, 2] and strides[2] == [1, 2, 2]
    assert all(k[1:] == [3, 3] for k in kernels)
    assert full.patch_size[0] < min(full.patch_size[1:])  # fewer, thicker slices
    assert any("transposed [2, 0, 1]" in note for note in full.notes)


def test_2d_slices_the_fine_plane(coarse_last):
    two_d = coarse_last.configurations["2d"]
    assert two_d.target_spacing == pytest.approx([0.8, 0.8])
    assert two_d.median_shape == pytest.approx([300, 300])
    assert two_d.patch_size[0] == two_d.patch_size[1] >= 256


def test_same_configurations_either_way(coarse_last, coarse_first):
    assert coarse_first.transpose_forward == [0, 1, 2]
    assert set(coarse_last.configurations) == set(coarse_first.configurations)
    for name, config in coarse_first.configurations.items():
        other = coarse_last.configurations[name]
        assert other.target_spacing == pytest.approx(config.target_spacing)
        assert other.patch_size == config.patch_size
        assert other.batch_size == config.batch_size
        assert other.architecture.strides == config.architecture.strides
        assert other.architecture.kernel_sizes == config.architecture.kernel_sizes
        assert other.resampling == config.resampling
        suffix = "; raw axes transposed [2, 0, 1] so the coarse axis comes first"
        assert [n.replace(suffix, "") for n in other.notes] == config.notes


def test_same_configurations_either_way_with_varying_cases():
    spacings, shapes = uniform(7, (0.8, 0.8, 5.0), (300, 300, 40), jitter=0.1)
    forward = [2, 0, 1]
    last = plan_from_fingerprint(crafted_fingerprint(spacings, shapes), configurations=CONFIGS, architectures=["unet"])
    first = plan_from_fingerprint(
        crafted_fingerprint([[s[a] for a in forward] for s in spacings], [[n[a] for a in forward] for n in shapes]),
        configurations=CONFIGS, architectures=["unet"],
    )
    assert last.transpose_forward == forward and first.transpose_forward == [0, 1, 2]
    for name, config in first.configurations.items():
        other = last.configurations[name]
        assert other.target_spacing == config.target_spacing and other.median_shape == config.median_shape
        assert other.architecture == config.architecture and other.batch_size == config.batch_size


def test_table_names_the_transposition(coarse_last, coarse_first):
    assert "transposed [2, 0, 1]" in format_plans_table(coarse_last)
    assert "transposed" not in format_plans_table(coarse_first)


def test_isotropic_plans_carry_identity(tmp_path):
    plans = _plans((1.0, 1.0, 1.0), (64, 64, 64))
    assert plans.transpose_forward == [0, 1, 2] and plans.transpose_backward == [0, 1, 2]
    assert not any("transposed" in n for c in plans.configurations.values() for n in c.notes)


def test_round_trip_and_old_plans_load_as_identity(tmp_path, coarse_last):
    path = tmp_path / "plans.json"
    save_plans(coarse_last, path)
    data = json.loads(path.read_text())
    assert data["transpose_forward"] == [2, 0, 1] and data["transpose_backward"] == [1, 2, 0]
    assert load_plans(path).transpose_forward == [2, 0, 1]

    del data["transpose_forward"], data["transpose_backward"]  # a plans.json written before the field
    path.write_text(json.dumps(data))
    old = load_plans(path)
    assert old.transpose_forward == [0, 1, 2] and old.transpose_backward == [0, 1, 2]


def test_edited_plans_are_checked(coarse_last):
    data = coarse_last.to_json()
    data["transpose_forward"] = [1, 0, 2]  # edited forward without backward: say what backward must be
    with pytest.raises(ConfigurationError, match=r"not the inverse .* set it to \[1, 0, 2\]"):
        Plans.from_json(data)
    data["transpose_forward"], data["transpose_backward"] = [0, 1, 1], None
    with pytest.raises(ConfigurationError, match="not an order"):
        Plans.from_json(data)
    data["transpose_forward"], data["transpose_backward"] = [1, 0, 2], [1, 0, 2]
    assert Plans.from_json(data).transpose_forward == [1, 0, 2]


def test_2d_plans_are_identity():
    spacings, shapes = uniform(4, (0.5, 2.0), (256, 64), jitter=0.0)
    plans = plan_from_fingerprint(crafted_fingerprint(spacings, shapes, file_ending=".png"), architectures=["unet"])
    assert plans.transpose_forward == [0, 1] and plans.transpose_backward == [0, 1]
