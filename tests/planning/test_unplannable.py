"""An architecture that cannot be planned for a dataset is left out with a one-line reason (or, when asked
for by name, a one-line ConfigurationError); the planner never crashes."""
from __future__ import annotations

import dataclasses
import json

import pytest
from torch import nn

from autoseg.contracts.plans import Plans
from autoseg.errors import ConfigurationError
from autoseg.networks import registry
from autoseg.planning.planner import format_plans_table, plan_from_fingerprint

from tests.planning.helpers import crafted_fingerprint, uniform

HIPPOCAMPUS_LIKE = dict(spacing=(1.0, 1.0, 1.0), shape=(36, 50, 35))


def _needs_huge_patch(patch_size, dims, strides=None, **_):
    return [] if min(patch_size) >= 4096 else ["each axis must be at least 4096 voxels"]


class _FailsInTraining(nn.Module):
    """Stands for a network whose constraints miss a case: it keeps the SegmentationNetwork protocol (so it
    builds), but its forward raises, as batch norm did."""

    def __init__(self, in_channels: int, num_classes: int, patch_size) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, num_classes, 1)
        self.patch_size = tuple(patch_size)
        self.ds_scales, self.ds_weights = [(1.0,) * len(patch_size)], [1.0]

    def forward(self, x):
        raise ValueError("Expected more than 1 value per channel when training")


def _fails_in_training(in_channels, num_classes, patch_size, strides, kernel_sizes, features,
                       deep_supervision=True):
    return _FailsInTraining(in_channels, num_classes, patch_size)


@pytest.fixture
def registry_with_problem_architectures(monkeypatch):
    """The registry holds only ``unet`` and two architectures that cannot be planned for ordinary images."""
    unet = registry.get("unet")
    strict = dataclasses.replace(unet, name="strict", dims=(3,), constraints=_needs_huge_patch)
    broken = dataclasses.replace(unet, name="broken", dims=(3,), builder=_fails_in_training)
    monkeypatch.setattr(registry, "_REGISTRY", {"unet": unet, "strict": strict, "broken": broken})


def _fingerprint():
    return crafted_fingerprint(*uniform(10, HIPPOCAMPUS_LIKE["spacing"], HIPPOCAMPUS_LIKE["shape"]))


def test_unplannable_architectures_are_left_out_with_a_one_line_reason(registry_with_problem_architectures):
    plans = plan_from_fingerprint(_fingerprint(), configurations=["3d_fullres"])
    assert list(plans.configurations) == ["3d_fullres"]
    assert set(plans.skipped) == {"3d_fullres_strict", "3d_fullres_broken"}
    assert "at least 4096 voxels" in plans.skipped["3d_fullres_strict"]
    assert plans.skipped["3d_fullres_broken"].startswith("its memory trace failed (ValueError: Expected more")
    assert all("\n" not in reason for reason in plans.skipped.values())

    table = format_plans_table(plans).splitlines()
    assert f"not planned: 3d_fullres_strict: {plans.skipped['3d_fullres_strict']}" in table
    assert any(line.startswith("not planned: 3d_fullres_broken: its memory trace failed") for line in table)


def test_skipped_configurations_survive_json_and_older_plans_still_load(registry_with_problem_architectures):
    plans = plan_from_fingerprint(_fingerprint(), configurations=["3d_fullres"])
    data = json.loads(json.dumps(plans.to_json()))
    assert Plans.from_json(data) == plans
    del data["skipped"]  # a plans.json written before the field existed
    assert Plans.from_json(data).skipped == {}


@pytest.mark.parametrize("architecture,reason", [
    ("strict", "at least 4096 voxels"),
    ("broken", "memory trace failed"),
])
def test_an_architecture_asked_for_by_name_fails_with_one_line_naming_it_the_shape_and_the_fix(
    registry_with_problem_architectures, architecture, reason
):
    with pytest.raises(ConfigurationError) as caught:
        plan_from_fingerprint(_fingerprint(), configurations=["3d_fullres"], architectures=[architecture])
    message = str(caught.value)
    assert "\n" not in message
    assert f"architecture '{architecture}' cannot be planned for Dataset999_Crafted 3d_fullres" in message
    assert "median image 36x50x35 voxels at 1x1x1 mm" in message
    assert reason in message and "Fix: give a patch it accepts with --patch-size" in message


def test_nothing_plannable_names_every_reason(registry_with_problem_architectures, monkeypatch):
    monkeypatch.delitem(registry._REGISTRY, "unet")
    with pytest.raises(ConfigurationError, match="nothing to plan.*3d_fullres_broken: its memory trace failed.*"
                       "3d_fullres_strict: .*4096"):
        plan_from_fingerprint(_fingerprint(), configurations=["3d_fullres"])
