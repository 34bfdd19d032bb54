"""autoseg.networks raises its own NetworkError; the stages that build networks from a plan turn it into the
ConfigurationError users see, with the same one-line text."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from autoseg.errors import ConfigurationError, reraised_as
from autoseg.networks import NetworkError, get
from tests.inference.conftest import make_plans


def test_a_network_error_becomes_a_configuration_error_with_the_same_text():
    with pytest.raises(ConfigurationError) as caught:
        with reraised_as(ConfigurationError, NetworkError):
            get("vnet")
    assert isinstance(caught.value.__cause__, NetworkError)
    assert str(caught.value) == str(caught.value.__cause__)
    assert str(caught.value).startswith("unknown architecture 'vnet'; available: ") and "\n" not in str(caught.value)
    with pytest.raises(KeyError):  # anything else passes through untouched
        with reraised_as(ConfigurationError, NetworkError):
            raise KeyError("not a network problem")


def _plans_with_a_misspelt_option():
    plans = make_plans()
    configuration = next(iter(plans.configurations.values()))
    configuration.architecture = dataclasses.replace(configuration.architecture, options={"nrom": "batch"})
    return plans, configuration


def test_trainer_and_predictor_report_a_bad_plan_as_a_configuration_error():
    from autoseg.inference.predictor import build_network as predictor_build_network
    from autoseg.training.trainer import build_network as trainer_build_network

    plans, configuration = _plans_with_a_misspelt_option()
    expected = r"^architecture 'unet' has no option\(s\) nrom; its options are: activation, dropout, norm$"
    with pytest.raises(ConfigurationError, match=expected):
        trainer_build_network(plans, configuration)
    with pytest.raises(ConfigurationError, match=expected):
        predictor_build_network(configuration, plans.num_channels, plans.num_classes, {}, Path("checkpoint.pt"))
