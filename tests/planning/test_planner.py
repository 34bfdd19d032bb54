import math

import pytest
import torch

from autoseg import networks
from autoseg.contracts.plans import Plans
from autoseg.errors import ConfigurationError
from autoseg.planning.planner import (
    choose_normalization,
    format_plans_table,
    initial_patch,
    normalization_scheme,
    plan_from_fingerprint,
)

from tests.planning.helpers import crafted_fingerprint, uniform


def plan_unet(fingerprint, **kwargs):
    return plan_from_fingerprint(fingerprint, architectures=["unet"], **kwargs)


def test_isotropic_3d_plans_2d_and_3d_fullres():
    fp = crafted_fingerprint(*uniform(20, (1.0, 1.0, 1.0), (64, 64, 64)))
    plans = plan_unet(fp)
    assert set(plans.configurations) == {"2d", "3d_fullres"}
    assert plans.default_configurations == ["2d", "3d_fullres"]
    full = plans.configurations["3d_fullres"]
    assert full.target_spacing == pytest.approx([1.0, 1.0, 1.0])
    assert full.resampling.separate_z is None
    # isotropic: every axis pooled the same number of times, kernels 3 everywhere
    assert len({sum(s[a] > 1 for s in full.architecture.strides) for a in range(3)}) == 1
    assert all(k == [3, 3, 3] for k in full.architecture.kernel_sizes)
    assert full.patch_size == [64, 64, 64]
    assert plans.configurations["2d"].target_spacing == pytest.approx([1.0, 1.0])
    assert plans.configurations["2d"].dims == 2


def test_thick_slices_use_percentile_spacing_in_plane_pooling_and_separate_z():
    fp = crafted_fingerprint(*uniform(11, (5.0, 0.8, 0.8), (14, 96, 96), jitter=0.1))
    full = plan_unet(fp).configurations["3d_fullres"]
    assert full.target_spacing[0] < 5.0  # 10th percentile of the slice spacings, not the median
    assert full.target_spacing[0] == pytest.approx(sorted(c.spacing[0] for c in fp.cases)[1], rel=0.05)
    assert full.architecture.strides[1] == [1, 2, 2]  # in-plane first
    assert full.architecture.kernel_sizes[0] == [1, 3, 3]
    assert full.resampling.separate_z is True and full.resampling.coarse_axis == 0
    assert any("10th percentile" in n for n in full.notes)


def test_2d_images_get_only_a_2d_configuration():
    fp = crafted_fingerprint(*uniform(10, (1.0, 1.0), (300, 200)), file_ending=".png")
    plans = plan_unet(fp)
    assert list(plans.configurations) == ["2d"]
    config = plans.configurations["2d"]
    assert config.dims == 2 and len(config.target_spacing) == 2 and len(config.patch_size) == 2
    assert config.batch_size >= 2
    with pytest.raises(ConfigurationError, match="only the 2d configuration"):
        plan_unet(fp, configurations=["3d_fullres"])


def test_tiny_images_clip_the_patch_to_the_image():
    fp = crafted_fingerprint(*uniform(10, (1.0, 1.0, 1.0), (20, 24, 16), jitter=0.0))
    plans = plan_unet(fp)
    full = plans.configurations["3d_fullres"]
    # clipped to the median shape then padded to the divisor: never more than one divisor step larger
    divisor = [math.prod(s[a] for s in full.architecture.strides) for a in range(3)]
    for p, m, d in zip(full.patch_size, full.median_shape, divisor):
        assert m <= p < m + d
    assert plans.configurations["2d"].patch_size == [24, 16]


def test_initial_patch_is_shaped_like_the_spacing():
    start = initial_patch([2.0, 1.0, 1.0], [1000, 1000, 1000])
    assert start[1] == start[2] == pytest.approx(2 * start[0], rel=0.02)
    assert math.prod(start) == pytest.approx(256**3, rel=0.02)


def test_large_images_shrink_the_patch_to_the_budget_and_plan_lowres():
    fp = crafted_fingerprint(*uniform(30, (1.0, 1.0, 1.0), (400, 400, 400), jitter=0.0))
    plans = plan_unet(fp, configurations=["3d_fullres", "3d_lowres", "3d_cascade_fullres"])
    full = plans.configurations["3d_fullres"]
    assert math.prod(full.patch_size) < 256**3
    assert full.memory_estimate_bytes <= plans_budget(plans)
    lowres = plans.configurations["3d_lowres"]
    assert all(lo > hi for lo, hi in zip(lowres.target_spacing, full.target_spacing))
    assert math.prod(lowres.patch_size) / math.prod(lowres.median_shape) >= 0.25
    cascade = plans.configurations["3d_cascade_fullres"]
    assert cascade.previous_stage == "3d_lowres" and cascade.data_identifier == "3d_fullres"
    assert plans.default_configurations == ["3d_fullres", "3d_cascade_fullres"]


def plans_budget(plans: Plans) -> int:
    from autoseg.planning.memory import memory_budget_bytes

    return memory_budget_bytes(plans.gpu_memory_gb)


def test_more_gpu_memory_never_gives_a_smaller_patch_or_batch():
    fp = crafted_fingerprint(*uniform(40, (1.0, 1.0, 1.0), (300, 300, 300), jitter=0.0))
    small = plan_unet(fp, configurations=["3d_fullres"], gpu_memory_gb=4).configurations["3d_fullres"]
    large = plan_unet(fp, configurations=["3d_fullres"], gpu_memory_gb=24).configurations["3d_fullres"]
    assert math.prod(large.patch_size) * large.batch_size > math.prod(small.patch_size) * small.batch_size


def test_batch_is_capped_at_five_percent_of_the_dataset_and_at_least_two():
    fp = crafted_fingerprint(*uniform(5, (1.0, 1.0, 1.0), (32, 32, 32), jitter=0.0))
    plans = plan_unet(fp)
    two_d = plans.configurations["2d"]
    # 5 cases x 32^3 voxels x 5 % / (32 x 32) = 8
    assert two_d.batch_size == 8
    assert plans.configurations["3d_fullres"].batch_size == 2  # 5 % rule says 0, the minimum is 2


@pytest.mark.parametrize("name,ending,expected", [
    ("CT", ".nii.gz", "ct"), ("ct", ".nrrd", "ct"), ("MRI", ".nii.gz", "zscore"), ("T2", ".nii.gz", "zscore"),
    ("R", ".png", "rgb_0_1"), ("green", ".png", "rgb_0_1"), ("R", ".nii.gz", "zscore"),
    ("noNorm", ".nii.gz", "none"), ("rescale_to_0_1", ".nii.gz", "rescale_0_1"), ("rgb_to_0_1", ".tif", "rgb_0_1"),
])
def test_normalization_scheme_by_channel_name(name, ending, expected):
    assert normalization_scheme(name, ending) == expected


def test_ct_and_mri_channels_and_the_mask_rule():
    schemes, masks = choose_normalization({"0": "CT", "1": "T1"}, ".nii.gz", 0.5)
    assert schemes == ["ct", "zscore"] and masks == [False, True]  # the mask only for z-score
    assert choose_normalization({"0": "T1"}, ".nii.gz", 0.8)[1] == [False]


def test_multi_channel_plans_keep_channel_order_and_count():
    fp = crafted_fingerprint(*uniform(10, (1.0, 1.0, 1.0), (40, 40, 40)),
                             channel_names={"0": "T1", "1": "CT", "2": "flair"}, relative_size=0.6)
    for config in plan_unet(fp).configurations.values():
        assert config.normalization == ["zscore", "ct", "zscore"]
        assert config.use_mask_for_norm == [True, False, True]


def test_forced_patch_size_is_used_and_made_valid():
    fp = crafted_fingerprint(*uniform(10, (1.0, 1.0, 1.0), (64, 64, 64)))
    plans = plan_unet(fp, patch_size=[30, 64, 64])
    full = plans.configurations["3d_fullres"]
    divisor = [math.prod(s[a] for s in full.architecture.strides) for a in range(3)]
    assert all(p % d == 0 for p, d in zip(full.patch_size, divisor))
    assert full.patch_size[1:] == [64, 64] and 30 <= full.patch_size[0] < 30 + divisor[0]
    assert plans.configurations["2d"].patch_size == [64, 64]  # a 3-axis patch leaves 2d alone


def test_unknown_configuration_and_architecture_are_user_errors():
    fp = crafted_fingerprint(*uniform(6, (1.0, 1.0, 1.0), (32, 32, 32)))
    with pytest.raises(ConfigurationError, match="unknown configuration"):
        plan_from_fingerprint(fp, configurations=["3d_highres"])
    with pytest.raises(ConfigurationError, match="unknown architecture"):
        plan_from_fingerprint(fp, architectures=["resnet9000"])


def test_plans_round_trip_through_json_and_table_lists_every_configuration(tmp_path):
    from autoseg.contracts.plans import load_plans, save_plans

    fp = crafted_fingerprint(*uniform(6, (1.0, 1.0, 1.0), (32, 32, 32)))
    plans = plan_unet(fp)
    save_plans(plans, tmp_path / "plans.json")
    assert load_plans(tmp_path / "plans.json") == plans
    table = format_plans_table(plans)
    for name, config in plans.configurations.items():
        assert name in table and "x".join(map(str, config.patch_size)) in table


@pytest.mark.slow
def test_every_registered_architecture_is_planned_and_runs_on_the_meta_device():
    fp = crafted_fingerprint(*uniform(10, (2.0, 0.8, 0.8), (24, 48, 40)), num_labels=3)
    plans = plan_from_fingerprint(fp)
    for arch in networks.available():
        info = networks.get(arch)
        for base, dims in (("2d", 2), ("3d_fullres", 3)):
            name = base if arch == "unet" else f"{base}_{arch}"
            assert (name in plans.configurations) == (dims in info.dims), name
    assert plans.default_configurations == ["2d", "3d_fullres"]
    for name, config in plans.configurations.items():
        spec = config.architecture
        assert not networks.constraints(spec.name, spec.patch_size, config.dims, strides=spec.strides)
        with torch.device("meta"):
            model = networks.build(spec.network_spec(1, 3))
            outputs = model(torch.zeros(2, 1, *config.patch_size))
        first = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        assert tuple(first.shape) == (2, 3, *config.patch_size), name
        assert config.memory_estimate_bytes > 0
        assert config.data_identifier == base_of(name)


def base_of(name: str) -> str:
    return "2d" if name.startswith("2d") else "3d_fullres"


@pytest.mark.slow
def test_every_architecture_fits_the_budget_on_large_2d_images():
    # Large RGB fundus-like images: an architecture whose own patch divisor is finer than the U-Net's
    # padding (unet2022) must still shrink its patch to the budget instead of keeping the whole image.
    fp = crafted_fingerprint(
        *uniform(20, (1.0, 1.0), (930, 930)), channel_names={"0": "R", "1": "G", "2": "B"}, file_ending=".png"
    )
    plans = plan_from_fingerprint(fp)
    budget = plans_budget(plans)
    for name, config in plans.configurations.items():
        fixed_and_batch = config.memory_estimate_bytes
        assert fixed_and_batch <= budget * 1.05 or config.batch_size == 2, (name, config.notes)
        assert not any("no smaller patch is possible" in note for note in config.notes), (name, config.notes)


def test_a_planned_configuration_gives_the_network_spec_its_memory_estimate_was_traced_on():
    from autoseg.planning.memory import training_memory_bytes

    fp = crafted_fingerprint(*uniform(20, (1.0, 1.0, 1.0), (64, 64, 64)))
    full = plan_unet(fp, configurations=["3d_fullres"]).configurations["3d_fullres"]
    spec = full.architecture.network_spec(1, 3)  # one channel, three labels (helpers.crafted_fingerprint)
    assert spec == networks.NetworkSpec("unet", 1, 3, full.patch_size, full.architecture.strides,
                                        full.architecture.kernel_sizes, full.architecture.features, True, {})
    assert networks.NetworkSpec.from_json(spec.to_json()) == spec
    # the plan's estimate is the memory trace of exactly this spec at the planned batch
    assert full.memory_estimate_bytes == training_memory_bytes(spec, full.batch_size)
