"""Planning presets (``autoseg plan --preset``): the table, what a preset changes, which memory size wins, and
the planner against nnU-Net 2.8.1's worked ResEnc examples (shared/reference/nnunet.md)."""
import json
import math

import pytest

from autoseg import networks
from autoseg.cli import build_parser, main
from autoseg.contracts.plans import Plans, load_plans
from autoseg.dataset.synthetic import SyntheticSpec, generate
from autoseg.errors import ConfigurationError
from autoseg.planning.planner import format_plans_table, plan_from_fingerprint
from autoseg.planning.presets import PRESETS, get_preset, preset_memory

from tests.planning.helpers import crafted_fingerprint, uniform

# MSD Hippocampus: 260 training cases, median ~36x50x35 voxels at 1 mm isotropic after cropping
HIPPOCAMPUS_LIKE = crafted_fingerprint(*uniform(260, (1.0, 1.0, 1.0), (36, 50, 35), jitter=0.0))


def test_the_table_holds_nnunets_resenc_presets():
    assert {name: (p.architecture, p.gpu_memory_gb, p.max_dataset_fraction_per_batch) for name, p in
            PRESETS.items()} == {"resenc-m": ("resenc", 8.0, 1.0), "resenc-l": ("resenc", 24.0, 1.0),
                                 "resenc-xl": ("resenc", 40.0, 1.0)}
    for preset in PRESETS.values():
        assert set(networks.get(preset.architecture).dims) == {2, 3}
    with pytest.raises(ConfigurationError, match="resenc-l"):
        get_preset("resenc-xxl")


def test_the_cli_help_names_every_preset():
    plan = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices and "plan" in a.choices)
    preset_option = next(a for a in plan.choices["plan"]._actions if "--preset" in a.option_strings)
    assert preset_option.metavar == "{" + ",".join(PRESETS) + "}"


def test_resenc_m_on_a_hippocampus_like_set_is_near_nnunets_plan():
    """nnU-Net 2.8.1, ResEnc M: 3d_fullres 40x56x40, batch 58. Ours: the same patch, batch 47.

    The patch is the median image padded to the divisor in both. The batch is memory-limited in both (the
    5 % cap, 9 here, is lifted): our trace charges the residual encoder's real saved activations (1.22x the
    plain U-Net's per sample) and its 26 M parameters with gradients and momentum (0.31 GB) to the same byte
    budget that reproduces nnU-Net's plain U-Net plans, while nnU-Net's ResEnc M planner raises its
    reference value by 21 % (680e6 against 560e6 feature-map elements at 8 GB) and measured 9.1 GB in use
    for "8 GB" (nnU-Net Revisited). So ours stays inside 8 GB and takes ~20 % fewer samples."""
    plans = plan_from_fingerprint(HIPPOCAMPUS_LIKE, configurations=["3d_fullres"], preset="resenc-m")
    assert list(plans.configurations) == ["3d_fullres_resenc"]
    assert plans.default_configurations == ["3d_fullres_resenc"]
    assert plans.preset == "resenc-m" and plans.gpu_memory_gb == 8.0
    config = plans.configurations["3d_fullres_resenc"]
    assert config.architecture.name == "resenc"
    assert config.patch_size == [40, 56, 40]
    assert 0.75 * 58 <= config.batch_size <= 1.1 * 58, config.batch_size
    assert config.memory_estimate_bytes <= 8 * 2**30
    assert any(n.startswith("preset resenc-m") for n in config.notes)
    assert "preset resenc-m" in format_plans_table(plans)

    # the same dataset without the preset: the 5 % rule caps the batch (nnU-Net's plain plan: batch 9)
    plain = plan_from_fingerprint(HIPPOCAMPUS_LIKE, configurations=["3d_fullres"], architectures=["resenc"])
    assert plain.preset is None
    assert plain.configurations["3d_fullres_resenc"].batch_size == 9
    assert plain.default_configurations == []  # without a preset the plain U-Net's configurations are the defaults


def test_resenc_l_on_a_300_cubed_isotropic_set_is_near_nnunets_plan():
    """nnU-Net 2.8.1, ResEnc L: 192x192x192, batch 2. Ours: 192x192x160, batch 2 (17 % fewer voxels).

    Both shrink the 256^3 start patch until batch 2 fits 24 GB. Our trace puts ResEnc at 192^3 and batch 2 at
    16.1e9 bytes against a 24 GB budget of 14.1e9 (the plain U-Net at 192^3: 12.6e9, which fits, as in
    nnU-Net), so one more axis step is taken; nnU-Net's L planner instead raises its reference by 25 % over
    the plain U-Net's (2.1e9 against 3 x 560e6 elements), which admits 192^3."""
    fingerprint = crafted_fingerprint(*uniform(20, (1.0, 1.0, 1.0), (300, 300, 300), jitter=0.0))
    plans = plan_from_fingerprint(fingerprint, configurations=["3d_fullres"], preset="resenc-l")
    config = plans.configurations["3d_fullres_resenc"]
    assert plans.gpu_memory_gb == 24.0
    assert config.batch_size == 2
    assert all(axis in (160, 192) for axis in config.patch_size), config.patch_size
    assert math.prod(config.patch_size) >= 0.8 * 192**3
    assert config.memory_estimate_bytes <= 24 * 2**30


def test_gpu_memory_wins_over_the_preset_and_the_other_settings_stay():
    explicit = plan_from_fingerprint(HIPPOCAMPUS_LIKE, gpu_memory_gb=4.0, configurations=["3d_fullres"],
                                     preset="resenc-m")
    preset_size = plan_from_fingerprint(HIPPOCAMPUS_LIKE, configurations=["3d_fullres"], preset="resenc-m")
    assert explicit.gpu_memory_gb == 4.0 and explicit.preset == "resenc-m"
    small, large = (p.configurations["3d_fullres_resenc"].batch_size for p in (explicit, preset_size))
    assert 9 < small < large  # half the memory, fewer samples, but still not capped at the 5 % rule's 9
    assert preset_memory(get_preset("resenc-l"), 12.0) == (
        12.0, "GPU memory budget: 12 GB from --gpu-memory (overrides the 24 GB of --preset resenc-l)")
    assert preset_memory(get_preset("resenc-l"), None)[0] == 24.0


def test_arch_adds_configurations_under_the_presets_settings():
    plans = plan_from_fingerprint(HIPPOCAMPUS_LIKE, configurations=["3d_fullres"], architectures=["unet"],
                                  preset="resenc-m")
    assert set(plans.configurations) == {"3d_fullres", "3d_fullres_resenc"}
    assert plans.default_configurations == ["3d_fullres_resenc"]
    # the lifted cap holds for every configuration of the plans, not only the preset's architecture
    assert plans.configurations["3d_fullres"].batch_size > 9


def test_plans_json_records_the_preset_and_old_plans_still_load():
    plans = plan_from_fingerprint(HIPPOCAMPUS_LIKE, configurations=["3d_fullres"], preset="resenc-m")
    data = json.loads(json.dumps(plans.to_json()))
    assert data["preset"] == "resenc-m"
    assert Plans.from_json(data) == plans
    del data["preset"]  # written before presets existed
    assert Plans.from_json(data).preset is None


def test_cli_plan_with_a_preset_writes_it_and_says_which_size_won(tmp_path, capsys):
    generate(tmp_path / "raw" / "Dataset905_Preset",
             SyntheticSpec(num_cases=4, shape=(8, 24, 24), spacing=(2.5, 1.0, 1.0)))
    common = ["plan", "905", "--root", str(tmp_path), "--no-preprocess", "-np", "1", "--configs", "3d_fullres"]
    assert main(common + ["--preset", "resenc-l", "--gpu-memory", "6"]) == 0
    out = capsys.readouterr().out
    assert "6 GB from --gpu-memory (overrides the 24 GB of --preset resenc-l)" in out
    plans = load_plans(tmp_path / "preprocessed" / "Dataset905_Preset" / "plans.json")
    assert plans.preset == "resenc-l" and plans.gpu_memory_gb == 6.0
    assert list(plans.configurations) == ["3d_fullres_resenc"]

    assert main(common + ["--preset", "resenc-xl"]) == 0
    assert "40 GB from --preset resenc-xl" in capsys.readouterr().out
    assert load_plans(tmp_path / "preprocessed" / "Dataset905_Preset" / "plans.json").gpu_memory_gb == 40.0

    assert main(common + ["--preset", "resenc-s"]) == 1
    assert "unknown preset 'resenc-s'" in capsys.readouterr().err


def test_the_presets_architecture_judges_the_lowres_rule_and_forms_the_cascade():
    fingerprint = crafted_fingerprint(*uniform(30, (1.0, 1.0, 1.0), (400, 400, 400), jitter=0.0))
    plans = plan_from_fingerprint(fingerprint, configurations=["3d_fullres", "3d_lowres", "3d_cascade_fullres"],
                                  preset="resenc-m")
    assert set(plans.configurations) == {"3d_fullres_resenc", "3d_lowres_resenc", "3d_cascade_fullres_resenc"}
    assert plans.default_configurations == ["3d_fullres_resenc", "3d_cascade_fullres_resenc"]
    lowres = plans.configurations["3d_lowres_resenc"]
    assert lowres.architecture.name == "resenc"
    assert math.prod(lowres.patch_size) / math.prod(lowres.median_shape) >= 0.25
    assert plans.configurations["3d_cascade_fullres_resenc"].previous_stage == "3d_lowres_resenc"
