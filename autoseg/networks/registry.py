"""The one door to every network: a name -> builder registry (timm's ``create_model`` idea, style.md).

The planner and trainer never switch on architecture names; they ask the registry.

Build call::

    build(spec: NetworkSpec) -> nn.Module

:class:`~autoseg.networks.spec.NetworkSpec` holds the plain U-Net topology the planner derives (nnU-Net's
topology: one entry per resolution stage, first stride all ones; per-axis values in array axis order), the
channels, the classes, ``deep_supervision`` and the architecture's own JSON-able options. Each variant maps
the topology onto its own (architectures.md 6.1/6.2). The builder registered for a name is called as
``builder(in_channels, num_classes, patch_size, strides, kernel_sizes, features, deep_supervision, **options)``;
its signature says which options the architecture takes.

What every built network provides (logits, deep-supervision scales and weights, SelfReg features, patch size,
the spec) is the :class:`~autoseg.networks.protocol.SegmentationNetwork` protocol, documented in
:mod:`autoseg.networks.protocol`; ``build`` refuses a network that breaks its stated values.

Constraints
-----------
``constraints(name, patch_size, dims, strides=None, **options)`` lists readable problems (empty = accepted);
``check_patch`` raises :class:`autoseg.networks.errors.NetworkError` naming the architecture, the patch and
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

from autoseg.networks.errors import NetworkError
from autoseg.networks.protocol import protocol_problems
from autoseg.networks.spec import NetworkSpec

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
    """The :class:`ArchitectureInfo` of ``name``; unknown names raise NetworkError listing the choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise NetworkError(
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
        raise NetworkError(
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
        raise NetworkError(f"{name} supports {info.dims}D only, not {dims}D")
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
    NetworkError.
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
    raise NetworkError(
        f"architecture {name!r}: no accepted patch near {tuple(patch_size)}: {'; '.join(problems)}"
    )


def check_patch(
    name: str,
    patch_size: Sequence[int],
    dims: int,
    strides: Sequence[Sequence[int]] | None = None,
    **options: Any,
) -> None:
    """Raise NetworkError when ``name`` cannot use ``patch_size``; the message names the fix."""
    problems = constraints(name, patch_size, dims, strides=strides, **options)
    if not problems:
        return
    fix = "choose a patch the architecture accepts"
    if strides is not None and dims in get(name).dims and len(patch_size) == dims:
        try:
            divisor = patch_divisor(name, strides, dims, **options)
            suggestion = adjust_patch(name, patch_size, strides, dims, **options)
            fix = f"use a multiple of {divisor} per axis, e.g. patch {suggestion}"
        except NetworkError:
            pass
    raise NetworkError(
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
        raise NetworkError(
            f"topology lists differ in length: {len(strides)} strides, {len(kernel_sizes)} kernel sizes, "
            f"{len(features)} feature counts (one entry per stage expected)"
        )
    for what, values in (("strides", strides), ("kernel_sizes", kernel_sizes)):
        for stage, value in enumerate(values):
            if len(value) != dims:
                raise NetworkError(
                    f"{what}[{stage}] = {list(value)} has {len(value)} axes; the patch {tuple(patch_size)} has {dims}"
                )
    if any(s != 1 for s in strides[0]):
        raise NetworkError(f"the first stage must have stride 1 on every axis, got {list(strides[0])}")


def build(spec: NetworkSpec) -> nn.Module:
    """Build the network ``spec`` describes: the one door to every architecture.

    The topology and the patch are checked first, so an invalid plan fails here with a message naming the fix
    rather than deep inside a forward pass; the built network carries ``spec`` and is checked against the
    :class:`~autoseg.networks.protocol.SegmentationNetwork` protocol's stated values.
    """
    info = get(spec.name)
    _validate_topology(spec.patch_size, spec.strides, spec.kernel_sizes, spec.features)
    options = dict(spec.options)
    _check_options(info, info.builder, options)
    check_patch(spec.name, spec.patch_size, spec.dims, strides=spec.strides, **constraint_options(spec.name, options))
    network = info.builder(
        in_channels=spec.in_channels,
        num_classes=spec.num_classes,
        patch_size=spec.patch_size,
        strides=list(spec.strides),
        kernel_sizes=list(spec.kernel_sizes),
        features=list(spec.features),
        deep_supervision=spec.deep_supervision,
        **options,
    )
    network.spec = spec
    problems = protocol_problems(network, spec)
    if problems:
        # a bug of the architecture, not of the plan: no user can fix it
        raise TypeError(f"architecture {spec.name!r} breaks the SegmentationNetwork protocol: {'; '.join(problems)}")
    return network


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
