"""Networks: one registry, one file per architecture, SelfReg losses, and summaries (params, FLOPs, memory).

Use :func:`build` to make a network; :func:`constraints`, :func:`check_patch`, :func:`patch_divisor` and
:func:`adjust_patch` (with the options :func:`constraint_options` picks) let the planner choose patches without
knowing architecture names. The protocol every
network follows is documented in :mod:`autoseg.networks.registry`.
"""
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

# importing an architecture module registers it
from autoseg.networks import resenc, unet, unet2022, unetpp, unetrpp  # noqa: E402,F401

__all__ = [
    "ArchitectureInfo",
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
