"""Imports run one way: from the commands down through the stages to the contracts and the base modules.

Every module under autoseg/ is parsed with ``ast``; every import statement counts, at any depth (inside
functions too: a lazy import is still a dependency), relative imports resolved against the module's package.
The table below is the one in docs/internals.md ("Which way imports run"); keep the two the same.

An import the table does not allow fails with ``file:line``; so does a cycle between packages.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autoseg"

# Base modules, lowest first: each may import only those before it ("only among themselves, downwards").
BASE = ("errors", "fileio", "paths", "device", "locks", "workers", "info")
# The root package (autoseg/__init__.py) holds __version__ and names the public API lazily, by string, so it
# has no import statement of autoseg (test_the_root_package_imports_nothing_of_autoseg): importing
# ``autoseg.__version__`` from anywhere creates no dependency on a stage.
ROOT = "autoseg"

# component -> what it may import besides itself. A component is a top-level module or package of autoseg/;
# an entry "package.module" allows that one module of a package only. "*": anything.
ALLOWED: dict[str, set[str]] = {
    **{name: set(BASE[:index]) for index, name in enumerate(BASE)},
    "io": set(BASE),
    "dataset": {"io", *BASE},
    # plus numpy/torch/cc3d; never a stage. networks: the plans turn an architecture entry into the NetworkSpec
    # the networks package owns (networks import nothing of autoseg, so this makes no cycle)
    # dataset: what dataset.json's labels mean (dataset.labels.LabelScheme), carried by plans and postprocessing
    "contracts": {"errors", "fileio", "paths", "networks", "dataset"},
    "networks": set(),  # torch only
    "planning": {"contracts", "dataset", "io", "networks", *BASE},
    "preprocessing": {"contracts", "dataset", "io", *BASE},
    # evaluation: the fold's final validation is scored by the same code `autoseg evaluate` runs
    "training": {"contracts", "networks", "preprocessing", "inference", "evaluation", "io", "dataset", *BASE},
    "inference": {"contracts", "networks", "preprocessing", "io", "dataset", *BASE},
    "evaluation": {"contracts", "io", "dataset", *BASE},
    # the commands and the runs that span stages
    "cli": {"*"}, "demo": {"*"}, "__main__": {"*"}, "pipeline": {"*"},
}



# ------------------------------------------------------------------------------------------------- scanner
def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str, package: Path) -> bool:
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    base = package / relative
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, package: Path) -> list[tuple[int, str]]:
    """``(line, imported autoseg module)`` for every import statement in ``path``, at any depth.

    ``from autoseg.x import y`` counts as importing ``autoseg.x.y`` when that is a module, else ``autoseg.x``;
    relative imports are resolved against the package of ``path``.
    """
    name = _module_name(path, package)
    own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = own_package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if _is_module(candidate, package) else base))
    root = package.name
    return [(line, module) for line, module in found if module == root or module.startswith(root + ".")]


def component(module: str) -> str:
    """``autoseg.training.trainer`` -> ``training``; ``autoseg.errors`` -> ``errors``; ``autoseg`` -> ``autoseg``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def allowed(source: str, target_module: str) -> bool:
    target = component(target_module)
    if target == source or target == ROOT:
        return True
    rules = ALLOWED.get(source)
    if rules is None:
        return False  # a new top-level module or package: give it a row in the table
    if "*" in rules or target in rules:
        return True
    return any(target_module == f"autoseg.{entry}" or target_module.startswith(f"autoseg.{entry}.")
               for entry in rules if "." in entry)


def scan(package: Path) -> list[tuple[str, int, str, str]]:
    """``(file relative to the package, line, source component, imported module)`` for every autoseg import."""
    edges = []
    for path in sorted(package.rglob("*.py")):
        source = component(_module_name(path, package))
        relative = path.relative_to(package).as_posix()
        edges += [(relative, line, source, module) for line, module in imports_of(path, package)]
    return edges


def violations(edges, exceptions) -> list[str]:
    return [f"autoseg/{file}:{line}: {source} imports {module}, which the table in {Path(__file__).name} "
            "does not allow" for file, line, source, module in edges
            if not allowed(source, module) and (file, module) not in exceptions]


def find_cycle(edges) -> list[str] | None:
    """A cycle in the graph of components (``[a, b, ..., a]``), or None."""
    graph: dict[str, set[str]] = {}
    for _, _, source, module in edges:
        target = component(module)
        if target != source:
            graph.setdefault(source, set()).add(target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


# --------------------------------------------------------------------------------------------------- tests
def test_every_import_goes_the_allowed_way():
    edges = scan(PACKAGE)
    assert len(edges) > 100, "the scanner found almost no imports; it is broken"
    problems = violations(edges, {})
    assert not problems, "\n".join(problems)


def test_the_package_graph_has_no_cycle():
    cycle = find_cycle(scan(PACKAGE))
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or [])


def test_the_root_package_imports_nothing_of_autoseg():
    found = imports_of(PACKAGE / "__init__.py", PACKAGE)
    assert not found, f"autoseg/__init__.py imports {found}: its attributes must stay lazy (by name)"


def test_every_component_has_a_row_in_the_table():
    components = {component(_module_name(p, PACKAGE)) for p in PACKAGE.rglob("*.py")} - {ROOT}
    assert components - set(ALLOWED) == set()


def test_the_scanner_sees_lazy_relative_and_from_imports(tmp_path):
    """The checks above fail when they should: a planted wrong-way import and a cycle are found."""
    package = tmp_path / "autoseg"
    for folder in ("", "contracts", "planning", "preprocessing", "evaluation"):
        (package / folder).mkdir(exist_ok=True)
        (package / folder / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    (package / "evaluation" / "metrics.py").write_text("")
    (package / "contracts" / "plans.py").write_text("from ..errors import X\n")  # relative, allowed
    (package / "preprocessing" / "case.py").write_text(
        "def f():\n    from ..planning import spacing\n")  # lazy, relative, not allowed
    (package / "planning" / "spacing.py").write_text("")
    (package / "planning" / "__init__.py").write_text("import autoseg.preprocessing.case\n")  # makes a cycle
    (package / "evaluation" / "evaluate.py").write_text("from autoseg import evaluation\n")
    edges = scan(package)
    assert ("contracts/plans.py", 1, "contracts", "autoseg.errors") in edges
    assert ("preprocessing/case.py", 2, "preprocessing", "autoseg.planning.spacing") in edges
    assert ("evaluation/evaluate.py", 1, "evaluation", "autoseg.evaluation") in edges
    name = Path(__file__).name
    assert violations(edges, {}) == [
        f"autoseg/planning/__init__.py:1: planning imports autoseg.preprocessing.case, which the table in {name} "
        "does not allow",
        f"autoseg/preprocessing/case.py:2: preprocessing imports autoseg.planning.spacing, which the table in "
        f"{name} does not allow",
    ]
    assert find_cycle(edges) == ["planning", "preprocessing", "planning"]


@pytest.mark.parametrize("source, module, expected", [
    ("training", "autoseg.evaluation.metrics", True),
    ("training", "autoseg.evaluation.evaluate", True),
    ("training", "autoseg.inference", True),
    ("inference", "autoseg.training.checkpoint", False),
    ("contracts", "autoseg.planning.spacing", False),
    ("contracts", "autoseg.device", False),
    ("errors", "autoseg.fileio", False),
    ("fileio", "autoseg.errors", True),
    ("networks", "autoseg.errors", False),
    ("cli", "autoseg.training", True),
    ("planning", "autoseg", True),
])
def test_table_reads_as_documented(source, module, expected):
    assert allowed(source, module) is expected
