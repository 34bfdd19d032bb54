"""What every built network provides: the :class:`SegmentationNetwork` protocol.

The trainer, the predictor, the exporter and the summaries use a network only through these members, so a new
architecture is one file plus one ``@register`` entry (docs/architectures.md, "Adding an architecture"), and
nothing outside :mod:`autoseg.networks` asks which architecture it holds. :func:`autoseg.networks.build`, the
one door, checks the stated values of every network it builds (:func:`protocol_problems`), so an architecture
that breaks the contract fails when it is built rather than inside a training run.

Members
-------
- ``forward(x)`` with ``x`` of shape ``[B, in_channels, *patch_size]`` returns logits (never softmax). With
  deep supervision a list of tensors ``[B, num_classes, *spatial]``, highest resolution first, one per entry
  of ``ds_scales``; without it one tensor at the input resolution. (In eval mode an architecture may return
  fewer outputs, e.g. UNet++ pruned or in its "accurate" mode; the first output is always the prediction.)
- ``forward(x, return_features=True)`` returns ``(outputs, features)`` with ``features`` a dict
  ``{"encoder": [tensors], "decoder": [tensors], "final": tensor}`` (architectures.md 5.6): the maps the
  SelfReg losses (:mod:`autoseg.networks.selfreg`) read; ``final`` is the last decoder map, the one fed to the
  head of the highest-resolution output (at the input resolution for the U-Nets and UNETR++, at a quarter of
  it for UNet-2022, whose head upsamples). Only architectures registered with ``supports_selfreg=True``
  promise this.
- ``ds_scales``: per training output, the per-axis scale relative to the input (``1`` = full resolution), so
  the trainer downsamples targets without knowing the architecture. Without deep supervision
  ``[(1.0,) * dims]``.
- ``ds_weights``: the default loss weight per training output (non-negative, sums to 1), as each paper uses
  them. Without deep supervision ``[1.0]``.
- ``patch_size``: the patch it was built for (a hard requirement for fixed-size networks such as UNETR++).
- ``spec``: the :class:`~autoseg.networks.spec.NetworkSpec` it was built from (set by ``build``).
"""
from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch

from autoseg.networks.spec import NetworkSpec

# tolerance of "the weights sum to 1": they are fractions such as 4/7 computed in floating point
WEIGHT_SUM_TOLERANCE = 1e-6


@runtime_checkable
class SegmentationNetwork(Protocol):
    """The members every network built by :func:`autoseg.networks.build` has (see the module docstring).

    ``isinstance(network, SegmentationNetwork)`` checks that they exist; :func:`protocol_problems` checks
    their values."""

    spec: NetworkSpec
    patch_size: tuple[int, ...]
    ds_scales: list[tuple[float, ...]]
    ds_weights: list[float]

    def forward(self, x: torch.Tensor, return_features: bool = False) -> Any:
        """Logits (a list with deep supervision, highest resolution first), or ``(logits, features)``."""
        ...


def protocol_problems(network: Any, spec: NetworkSpec) -> list[str]:
    """Readable reasons why ``network`` (built from ``spec``) breaks the protocol's stated values; empty when
    it keeps them. What its forward returns is checked by tests/networks/test_protocol.py, not here: building
    must stay free of arithmetic (the planner builds on the ``meta`` device)."""
    missing = [name for name in ("spec", "patch_size", "ds_scales", "ds_weights", "forward")
               if not hasattr(network, name)]
    if missing:
        return [f"missing {', '.join(missing)}"]
    problems = []
    dims = spec.dims
    if tuple(network.patch_size) != spec.patch_size:
        problems.append(f"patch_size {tuple(network.patch_size)} is not the spec's {spec.patch_size}")
    scales = [tuple(float(f) for f in scale) for scale in network.ds_scales]
    weights = [float(w) for w in network.ds_weights]
    if not scales or len(scales) != len(weights):
        problems.append(f"{len(scales)} ds_scales but {len(weights)} ds_weights (one each per output, at least 1)")
    if any(len(scale) != dims or not all(0 < f <= 1 for f in scale) for scale in scales):
        problems.append(f"ds_scales {scales} must hold {dims} factors in (0, 1] per output")
    elif scales and (scales[0] != (1.0,) * dims
                     or any(math.prod(a) < math.prod(b) for a, b in zip(scales, scales[1:]))):
        problems.append(f"ds_scales {scales} must start at full resolution and never grow (highest first)")
    if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > WEIGHT_SUM_TOLERANCE:
        problems.append(f"ds_weights {weights} must be non-negative and sum to 1")
    if not spec.deep_supervision and (scales != [(1.0,) * dims] or weights != [1.0]):
        problems.append(f"without deep supervision ds_scales must be [{(1.0,) * dims}] and ds_weights [1.0], "
                        f"got {scales} and {weights}")
    return problems
