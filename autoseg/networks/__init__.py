"""Networks: one registry, one file per architecture, SelfReg losses, and summaries (params, FLOPs, memory).

Use :func:`build` with a :class:`NetworkSpec` to make a network; every network it returns follows the
:class:`SegmentationNetwork` protocol (:mod:`autoseg.networks.protocol`). :func:`constraints`,
:func:`check_patch`, :func:`patch_divisor` and :func:`adjust_patch` (with the options
:func:`constraint_options` picks) let the planner choose patches without knowing architecture names.
Problems raise :class:`NetworkError`. A network is built from numbers: this package imports nothing of
autoseg outside itself.
"""
from autoseg.networks.errors import NetworkError
from autoseg.networks.protocol import SegmentationNetwork
from autoseg.networks.registry import (
    ArchitectureInfo,
    adjust_patch,
    available,
    build,
    check_patch,
    constraint_options,
    constraints,
    get,
    patch_divisor,
    register,
)
from autoseg.networks.spec import NetworkSpec

# importing an architecture module registers it
from autoseg.networks import resenc, unet, unet2022, unetpp, unetrpp  # noqa: E402,F401

__all__ = [
    "ArchitectureInfo",
    "NetworkError",
    "NetworkSpec",
    "SegmentationNetwork",
    "adjust_patch",
    "available",
    "build",
    "check_patch",
    "constraint_options",
    "constraints",
    "get",
    "patch_divisor",
    "register",
]
