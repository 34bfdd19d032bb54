"""The one door to every network: a name -> builder registry (timm's ``create_model`` idea, style.md).

The planner and trainer never switch on architecture names; they ask the registry.

Build call (all per-axis values in array axis order: ``(Z, Y, X)`` in 3D, ``(Y, X)`` in 2D)::

    build(name, in_channels, num_classes, patch_size, strides, kernel_sizes, features,
          deep_supervision=True, **variant_options) -> nn.Module

``strides``, ``kernel_sizes`` and ``features`` describe the plain U-Net topology the planner derives
(nnU-Net's topology: one entry per resolution stage, first stride all ones). Each variant maps it onto its
own topology (architectures.md 6.1/6.2) and may take extra JSON-able ``variant_options``.

Protocol every built network follows
------------------------------------
- ``forward(x)`` returns logits (never softmax). With ``deep_supervision=True`` a list of tensors, highest
  resolution first; with ``deep_supervision=False`` one tensor at the input resolution.
- ``forward(x, return_features=True)`` returns ``(outputs, features)`` where ``features`` is a dict
  ``{"encoder": [tensors], "decoder": [tensors], "final": tensor}`` (architectures.md 5.6): the maps the
  SelfReg losses (:mod:`autoseg.networks.selfreg`) read. ``final`` is the full-resolution map fed to the
  segmentation head. Only networks registered with ``supports_selfreg=True`` promise this.
- ``network.ds_scales``: per output, the per-axis scale relative to the input (``1`` = full resolution),
  so the trainer can downsample targets without knowing the architecture.
- ``network.ds_weights``: the default loss weight per output (sums to 1), as each paper uses them.
- ``network.patch_size``: the patch it was built for (a hard requirement for fixed-size networks).

Constraints
-----------
``constraints(name, patch_size, dims, strides=None, **options)`` lists readable problems (empty = accepted);
``check_patch`` raises :class:`autoseg.errors.ConfigurationError` naming the architecture, the patch and
the fix. ``patch_divisor`` gives the per-axis multiple a patch must be of, and ``adjust_patch`` rounds a
patch to the nearest accepted one, so the planner can search patch sizes without knowing the architecture.
``constraint_options(name, options)`` picks, from a configuration's build options, the ones to pass to these
functions. Every limit a network has (divisibility, window and token sizes, the smallest bottleneck its
normalisation layers accept) is declared in its constraint function, so a patch that passes
``check_patch`` builds and runs a training step (tests/planning/test_sweep.py holds every architecture to it).
"""
from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

from autoseg.errors import ConfigurationError

Builder = Callable[..., nn.Module]
ConstraintFn = Callable[..., list[str]]
DivisorFn = Callable[..., tuple[int, ...]]


@dataclass(frozen=True)
class ArchitectureInfo:
    """What the registry knows about one architecture.

    ``builder(in_channels, num_classes, patch_size, strides, kernel_sizes, features, deep_supervision,
    **options)`` builds it; ``constraints(patch_size, dims, strides=None, **options)`` returns problems;
    ``divisor(strides, dims, **options)`` gives the per-axis multiple a patch must be of.
    ``fixed_patch_size``: the network only accepts the patch it was built for (UNETR++).
    """

    name: str
    dims: tuple[int, ...]
    description: str
    builder: Builder
    constraints: ConstraintFn
    supports_selfreg: bool = True
    divisor: DivisorFn | None = None
    fixed_patch_size: bool = False
    citation: str = ""
    default_options: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ArchitectureInfo] = {}


def register(
    name: str,
    *,
    dims: tuple[int, ...],
    description: str,
    constraints: ConstraintFn,
    divisor: DivisorFn,
    supports_selfreg: bool = True,
    fixed_patch_size: bool = False,
    citation: str = "",
    default_options: dict[str, Any] | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under ``name``. Registering a name twice is a programming error."""

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise ValueError(f"architecture {name!r} is registered twice")
        _REGISTRY[name] = ArchitectureInfo(
            name=name,
            dims=tuple(dims),
            description=description,
            builder=builder,
            constraints=constraints,
            supports_selfreg=supports_selfreg,
            divisor=divisor,
            fixed_patch_size=fixed_patch_size,
            citation=citation,
            default_options=dict(default_options or {}),
        )
        return builder

    return decorator


def available() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> ArchitectureInfo:
    """The :class:`ArchitectureInfo` of ``name``; unknown names raise ConfigurationError listing the choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown architecture {name!r}; available: {', '.join(available())}"
        ) from None


def _generic_problems(info: ArchitectureInfo, patch_size: Sequence[int], dims: int) -> list[str]:
    problems = []
    if dims not in info.dims:
        supported = " or ".join(f"{d}D" for d in info.dims)
        problems.append(f"{info.name} supports {supported} only, not {dims}D")
    if len(patch_size) != dims:
        problems.append(f"patch {tuple(patch_size)} has {len(patch_size)} axes but dims is {dims}")
    if any(int(p) <= 0 for p in patch_size):
        problems.append(f"patch {tuple(patch_size)} has a non-positive axis")
    return problems


def _check_options(info: ArchitectureInfo, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """Unknown variant options are a user mistake (a typo in plans.json): say which and what is allowed."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params))
    if unknown:
        allowed = sorted(
            n for n, p in params.items()
            if p.default is not inspect.Parameter.empty and n not in ("deep_supervision", "strides")
        )
        raise ConfigurationError(
            f"architecture {info.name!r} has no option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(allowed) or 'none'}"
        )


def constraints(
    name: str,
    patch_size: Sequence[int],
    dims: int,
    strides: Sequence[Sequence[int]] | None = None,
    **options: Any,
) -> list[str]:
    """Human-readable reasons why ``name`` cannot take ``patch_size`` (empty list = accepted).

    ``strides`` (the planner's topology) is needed for divisibility checks of the U-Net family; without it
    only the checks that do not depend on the topology run.
    """
    info = get(name)
    problems = _generic_problems(info, patch_size, dims)
    if problems:
        return problems
    _check_options(info, info.constraints, options)
    return list(info.constraints(tuple(int(p) for p in patch_size), dims, strides=strides, **options))


def patch_divisor(
    name: str, strides: Sequence[Sequence[int]], dims: int, **options: Any
) -> tuple[int, ...]:
    """Per-axis multiple that a patch must be of for ``name`` with this topology."""
    info = get(name)
    if dims not in info.dims:
        raise ConfigurationError(f"{name} supports {info.dims}D only, not {dims}D")
    _check_options(info, info.divisor, options)
    return tuple(int(d) for d in info.divisor(strides, dims, **options))


def adjust_patch(
    name: str,
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    dims: int,
    **options: Any,
) -> tuple[int, ...]:
    """The accepted patch nearest to ``patch_size``: each axis rounded to the nearest multiple of the divisor
    (at least one multiple). If other constraints (token counts, windows) still fail, the smallest-volume
    patch that grows each axis by at most 4 divisor steps and is accepted is returned; else
    ConfigurationError.
    """
    divisor = patch_divisor(name, strides, dims, **options)
    patch = tuple(max(d, int(round(p / d)) * d) for p, d in zip(patch_size, divisor))
    if not constraints(name, patch, dims, strides=strides, **options):
        return patch
    candidates = sorted(
        (tuple(p + k * d for p, k, d in zip(patch, steps, divisor)) for steps in itertools.product(range(5), repeat=dims)),
        key=lambda c: (math.prod(c), max(c)),
    )
    for candidate in candidates:
        if not constraints(name, candidate, dims, strides=strides, **options):
            return candidate
    problems = constraints(name, patch, dims, strides=strides, **options)
    raise ConfigurationError(
        f"architecture {name!r}: no accepted patch near {tuple(patch_size)}: {'; '.join(problems)}"
    )


def check_patch(
    name: str,
    patch_size: Sequence[int],
    dims: int,
    strides: Sequence[Sequence[int]] | None = None,
    **options: Any,
) -> None:
    """Raise ConfigurationError when ``name`` cannot use ``patch_size``; the message names the fix."""
    problems = constraints(name, patch_size, dims, strides=strides, **options)
    if not problems:
        return
    fix = "choose a patch the architecture accepts"
    if strides is not None and dims in get(name).dims and len(patch_size) == dims:
        try:
            divisor = patch_divisor(name, strides, dims, **options)
            suggestion = adjust_patch(name, patch_size, strides, dims, **options)
            fix = f"use a multiple of {divisor} per axis, e.g. patch {suggestion}"
        except ConfigurationError:
            pass
    raise ConfigurationError(
        f"architecture {name!r} cannot use patch {tuple(patch_size)}: {'; '.join(problems)}. Fix: {fix}"
    )


def _validate_topology(
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    features: Sequence[int],
) -> None:
    dims = len(patch_size)
    if not (len(strides) == len(kernel_sizes) == len(features)):
        raise ConfigurationError(
            f"topology lists differ in length: {len(strides)} strides, {len(kernel_sizes)} kernel sizes, "
            f"{len(features)} feature counts (one entry per stage expected)"
        )
    for what, values in (("strides", strides), ("kernel_sizes", kernel_sizes)):
        for stage, value in enumerate(values):
            if len(value) != dims:
                raise ConfigurationError(
                    f"{what}[{stage}] = {list(value)} has {len(value)} axes; the patch {tuple(patch_size)} has {dims}"
                )
    if any(s != 1 for s in strides[0]):
        raise ConfigurationError(f"the first stage must have stride 1 on every axis, got {list(strides[0])}")


def build(
    name: str,
    in_channels: int,
    num_classes: int,
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    features: Sequence[int],
    deep_supervision: bool = True,
    **variant_options: Any,
) -> nn.Module:
    """Build architecture ``name`` for this topology (see the module docstring for the protocol).

    The patch is checked first, so an invalid plan fails here with a message naming the fix rather than deep
    inside a forward pass.
    """
    info = get(name)
    patch_size = tuple(int(p) for p in patch_size)
    strides = [tuple(int(s) for s in stage) for stage in strides]
    kernel_sizes = [tuple(int(k) for k in stage) for stage in kernel_sizes]
    features = [int(f) for f in features]
    _validate_topology(patch_size, strides, kernel_sizes, features)
    _check_options(info, info.builder, variant_options)
    check_patch(name, patch_size, len(patch_size), strides=strides, **constraint_options(name, variant_options))
    return info.builder(
        in_channels=int(in_channels),
        num_classes=int(num_classes),
        patch_size=patch_size,
        strides=strides,
        kernel_sizes=kernel_sizes,
        features=features,
        deep_supervision=bool(deep_supervision),
        **variant_options,
    )


def constraint_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The build options of ``name`` (e.g. ``stem``, ``windows``) to pass to :func:`constraints`,
    :func:`patch_divisor`, :func:`adjust_patch` and :func:`check_patch`: those that both its constraint and its
    divisor function accept (a function taking ``**kwargs`` accepts all), so neither rejects an option that
    only the builder reads."""
    info = get(name)
    keep = dict(options)
    for fn in (info.constraints, info.divisor):
        if fn is None:
            continue
        params = inspect.signature(fn).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            keep = {k: v for k, v in keep.items() if k in params}
    return keep


def divisible_by_strides(strides: Sequence[Sequence[int]], dims: int, **_: Any) -> tuple[int, ...]:
    """Divisor of the plain U-Net family: the product of the strides per axis."""
    return tuple(math.prod(stage[axis] for stage in strides) for axis in range(dims))
