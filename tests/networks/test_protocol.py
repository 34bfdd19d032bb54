"""Every registered architecture keeps the SegmentationNetwork protocol (autoseg/networks/protocol.py), in each
dimensionality it supports, with and without deep supervision; networks/ stands alone; NetworkSpec is JSON."""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import autoseg.networks
from autoseg.networks import (
    NetworkError,
    NetworkSpec,
    SegmentationNetwork,
    adjust_patch,
    available,
    build,
    constraint_options,
    get,
    registry,
)
from autoseg.networks.protocol import protocol_problems

from .tiny_plans import TINY_2D, TINY_3D

# options that keep the transformers small on CPU; an architecture not named here is built with none
SMALL_OPTIONS = {"unet2022": {"embed_dim": 32}}


def _cases() -> list[tuple[str, int, bool]]:
    return [(name, dims, deep) for name in available() for dims in get(name).dims for deep in (True, False)]


def _tiny_spec(name: str, dims: int, deep_supervision: bool) -> NetworkSpec:
    plan = dict(TINY_3D if dims == 3 else TINY_2D)
    options = SMALL_OPTIONS.get(name, {})
    patch = adjust_patch(name, plan["patch_size"], plan["strides"], dims, **constraint_options(name, options))
    return NetworkSpec(name, 1, 3, **dict(plan, patch_size=patch), deep_supervision=deep_supervision,
                       options=options)


@pytest.mark.parametrize("name, dims, deep", _cases(),
                         ids=[f"{n}-{d}d-{'ds' if s else 'nods'}" for n, d, s in _cases()])
def test_every_architecture_keeps_the_protocol(name, dims, deep):
    spec = _tiny_spec(name, dims, deep)
    network = build(spec)
    assert isinstance(network, SegmentationNetwork)
    assert network.spec == spec and tuple(network.patch_size) == spec.patch_size
    assert protocol_problems(network, spec) == []
    assert len(network.ds_scales) == len(network.ds_weights)
    assert sum(network.ds_weights) == pytest.approx(1.0) and min(network.ds_weights) >= 0
    if not deep:
        assert network.ds_scales == [(1.0,) * dims] and network.ds_weights == [1.0]

    x = torch.randn(2, 1, *spec.patch_size)
    network.train()
    outputs = network(x)
    if deep:
        assert isinstance(outputs, list)
    else:
        assert isinstance(outputs, torch.Tensor)
        outputs = [outputs]
    # the trainer makes one target per scale at round(patch * scale): each output must have exactly that shape
    assert len(outputs) == len(network.ds_scales)
    for output, scale in zip(outputs, network.ds_scales):
        expected = tuple(max(1, round(p * f)) for p, f in zip(spec.patch_size, scale))
        assert tuple(output.shape) == (2, spec.num_classes, *expected)

    if get(name).supports_selfreg:
        result, features = network(x, return_features=True)
        assert len(result if deep else [result]) == len(network.ds_scales)
        assert set(features) == {"encoder", "decoder", "final"}
        maps = [*features["encoder"], *features["decoder"], features["final"]]
        assert all(m.shape[0] == 2 and m.dim() == dims + 2 for m in maps)


def test_build_refuses_an_architecture_that_breaks_the_protocol(monkeypatch):
    class NoWeights(torch.nn.Module):  # states its scales but forgets the loss weights
        def __init__(self, patch_size, **_):
            super().__init__()
            self.patch_size = tuple(patch_size)
            self.ds_scales = [(1.0,) * len(patch_size)]

        def forward(self, x, return_features=False):
            return x

    monkeypatch.setitem(registry._REGISTRY, "noweights",
                        dataclasses.replace(get("unet"), name="noweights", builder=lambda **kw: NoWeights(**kw)))
    with pytest.raises(TypeError, match="'noweights' breaks the SegmentationNetwork protocol: missing ds_weights"):
        build(NetworkSpec("noweights", 1, 2, **TINY_3D))
    assert not isinstance(NoWeights((8, 8)), SegmentationNetwork)


def test_protocol_problems_name_wrong_values():
    spec = NetworkSpec("unet", 1, 2, **TINY_3D, deep_supervision=False)
    network = build(spec)
    network.ds_scales, network.ds_weights = [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5)], [0.5, 0.25]
    problems = protocol_problems(network, spec)
    assert any("sum to 1" in p for p in problems)
    assert any("without deep supervision" in p for p in problems)
    network.ds_scales, network.ds_weights = [(1.0, 0.5, 0.5), (1.0, 1.0, 1.0)], [0.5, 0.5]
    deep_spec = dataclasses.replace(spec, deep_supervision=True)
    assert any("highest first" in p for p in protocol_problems(network, deep_spec))


def _autoseg_imports_outside_networks(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports stay inside the package
                continue
            modules = [node.module or ""]
            if node.module == "autoseg":  # "from autoseg import x" names submodule x
                modules = [f"autoseg.{alias.name}" for alias in node.names]
        else:
            continue
        found += [f"{path.name}:{node.lineno} {m}" for m in modules
                  if (m == "autoseg" or m.startswith("autoseg.")) and not (m == "autoseg.networks"
                                                                            or m.startswith("autoseg.networks."))]
    return found


def test_networks_import_nothing_of_autoseg_outside_themselves(tmp_path):
    package = Path(autoseg.networks.__file__).parent
    files = sorted(package.rglob("*.py"))
    assert len(files) >= 10  # the scan really sees the package
    assert [hit for path in files for hit in _autoseg_imports_outside_networks(path)] == []
    # and the scan itself can fail: a file importing autoseg.errors, lazily or not, is caught
    offender = tmp_path / "offender.py"
    offender.write_text("def f():\n    from autoseg.errors import ConfigurationError\n    import autoseg.paths\n"
                        "from autoseg import planning\nfrom autoseg.networks import blocks\n")
    assert sorted(_autoseg_imports_outside_networks(offender)) == [
        "offender.py:2 autoseg.errors", "offender.py:3 autoseg.paths", "offender.py:4 autoseg.planning",
    ]


def test_network_spec_json_round_trip():
    spec = NetworkSpec("unet2022", 2, 4, (64, 32), [(1, 1), (2, 2)], [(3, 3), (3, 3)], [32, 64],
                       deep_supervision=False, options={"embed_dim": 32, "windows": ((4, 4), 4, 4, 2)})
    text = json.dumps(spec.to_json())
    again = NetworkSpec.from_json(json.loads(text))
    assert again == spec and hash(again) == hash(spec)
    assert again.options == {"embed_dim": 32, "windows": [[4, 4], 4, 4, 2]}  # JSON's form, as plans hold it
    assert json.loads(text)["schema_version"] == 1 and json.loads(text)["patch_size"] == [64, 32]
    # the same network given with lists and numpy-free ints compares and hashes equal
    listed = NetworkSpec("unet2022", 2, 4, [64, 32], [[1, 1], [2, 2]], [[3, 3], [3, 3]], (32, 64), False,
                         {"windows": [[4, 4], 4, 4, 2], "embed_dim": 32})
    assert listed == spec and hash(listed) == hash(spec)
    assert dataclasses.replace(spec, deep_supervision=True) != spec


def test_network_spec_refuses_what_json_cannot_hold_and_newer_schemas():
    with pytest.raises(NetworkError, match="options.norm .*not JSON-able"):
        NetworkSpec("unet", 1, 2, **TINY_3D, options={"norm": torch.nn.InstanceNorm3d})
    with pytest.raises(NetworkError, match="option\\(s\\) patch_size repeat a field"):
        NetworkSpec("unet", 1, 2, **TINY_3D, options={"patch_size": [8, 8, 8]})
    data = NetworkSpec("unet", 1, 2, **TINY_3D).to_json()
    with pytest.raises(NetworkError, match="schema_version 2 .*upgrade autoseg"):
        NetworkSpec.from_json(dict(data, schema_version=2))
    with pytest.raises(NetworkError, match="unknown \\['stride'\\], missing \\['strides'\\]"):
        NetworkSpec.from_json({("stride" if k == "strides" else k): v for k, v in data.items()})
