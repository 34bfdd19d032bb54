"""``NetworkSpec``: everything a network is built from, as plain numbers, passed whole.

The planner's topology (patch, strides, kernel sizes, features per stage; one entry per resolution stage,
the first stride all ones; every per-axis value in array axis order, ``(Z, Y, X)`` in 3D and ``(Y, X)`` in
2D), the channels in and the classes out, whether deep supervision is on, and the architecture's own
JSON-able options. The registry's :func:`autoseg.networks.build` takes one, the memory trace of the planner,
:mod:`autoseg.networks.summary` and :mod:`autoseg.networks.benchmark` take one, and every built network keeps
the one it was built from (``network.spec``). Plans make it with ``ArchitectureSpec.network_spec``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

from autoseg.networks.errors import NetworkError

NETWORK_SPEC_SCHEMA_VERSION = 1


def _json_form(value: Any, where: str) -> Any:
    """``value`` as JSON would give it back (tuples become lists), so a spec equals its JSON round trip;
    anything JSON cannot hold is refused, since options travel in plans.json and checkpoints."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NetworkError(f"option {where} = {value!r} is not a finite number; give a number JSON can hold")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_form(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise NetworkError(f"option {where} has non-string keys {list(value)}; JSON objects need string keys")
        return {key: _json_form(item, f"{where}.{key}") for key, item in value.items()}
    raise NetworkError(
        f"option {where} = {value!r} ({type(value).__name__}) is not JSON-able; options must be numbers, "
        "strings, booleans, null, lists or string-keyed objects"
    )


def _per_stage(values: Sequence[Sequence[int]], what: str) -> tuple[tuple[int, ...], ...]:
    try:
        return tuple(tuple(int(v) for v in stage) for stage in values)
    except TypeError:
        raise NetworkError(f"{what} must be one list of per-axis integers per stage, got {values!r}") from None


@dataclass(frozen=True)
class NetworkSpec:
    """One network, as numbers. Field values are normalised on construction (integers, tuples, options in
    their JSON form), so two specs of the same network compare and hash equal whatever sequences made them.

    ``options`` are the architecture's own build options (``norm``, ``windows``, ``variant``, ...); which ones
    it takes is the signature of its builder, and an unknown one is refused by :func:`build`. Do not mutate
    the options mapping: the spec is hashed (the planner caches memory traces by spec).
    """

    name: str
    in_channels: int
    num_classes: int
    patch_size: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    features: tuple[int, ...]
    deep_supervision: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__, the documented way for a frozen dataclass
        set_field = object.__setattr__
        set_field(self, "name", str(self.name))
        set_field(self, "in_channels", int(self.in_channels))
        set_field(self, "num_classes", int(self.num_classes))
        set_field(self, "patch_size", tuple(int(p) for p in self.patch_size))
        set_field(self, "strides", _per_stage(self.strides, "strides"))
        set_field(self, "kernel_sizes", _per_stage(self.kernel_sizes, "kernel_sizes"))
        set_field(self, "features", tuple(int(f) for f in self.features))
        set_field(self, "deep_supervision", bool(self.deep_supervision))
        options = _json_form(dict(self.options or {}), "options")
        reserved = sorted(set(options) & {f.name for f in fields(self)})
        if reserved:
            raise NetworkError(
                f"architecture {self.name!r}: option(s) {', '.join(reserved)} repeat a field of the network's "
                "topology; set them there, not among the options"
            )
        set_field(self, "options", options)

    def __hash__(self) -> int:
        # the generated hash would hash the options dict (unhashable); the canonical JSON text is equivalent
        return hash(json.dumps(self.to_json(), sort_keys=True))

    @property
    def dims(self) -> int:
        """2 or 3: the number of spatial axes (of the patch)."""
        return len(self.patch_size)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (lists, not tuples) with ``schema_version``."""
        data = json.loads(json.dumps(asdict(self)))  # tuples -> lists, as a JSON file gives them back
        return {"schema_version": NETWORK_SPEC_SCHEMA_VERSION, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "NetworkSpec":
        """The spec :meth:`to_json` wrote; a newer schema or unknown fields raise :class:`NetworkError`."""
        data = dict(data)
        version = data.pop("schema_version", None)
        if version != NETWORK_SPEC_SCHEMA_VERSION:
            raise NetworkError(
                f"network spec schema_version {version!r} is not {NETWORK_SPEC_SCHEMA_VERSION}; "
                "it was written by another autoseg version: upgrade autoseg or re-run `autoseg plan`"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        optional = ("deep_supervision", "options")
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.name not in optional)
        if unknown or missing:
            raise NetworkError(
                f"network spec fields do not match: unknown {unknown or 'none'}, missing {missing or 'none'}; "
                "re-run `autoseg plan`"
            )
        return cls(**data)
