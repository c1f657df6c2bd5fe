"""The package's layers point one way: read from the source, not from a running interpreter.

Every ``import`` of an actsparse module counts, at module level or inside a function (an
import hidden in a function is still an arrow); only ``if TYPE_CHECKING:`` blocks (types for
annotations, never run) and the heavy optional dependencies are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "actsparse"

# Every top-level module (actsparse/NAME.py) and every package is its own node of the graph.
# The bottom layer: these import nothing of actsparse but each other.
BASE = {"errors", "registry", "paths", "artifacts", "modules", "validate", "_version", "timing"}
FACADE = "api"  # actsparse/__init__.py: imports the layers, imported by none of them (the harness aside)
PACKAGES = {"core", "kernels", "calibration", "baselines", "models", "eval", "sweep", "report", "cli", "data", "amber", "hf"}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = SRC) -> set[str]:
    """The actsparse modules (or module attributes) a source file imports, TYPE_CHECKING blocks aside."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if _is_type_checking(node.test):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "actsparse")

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "actsparse":
                found.update(f"{module}.{alias.name}" for alias in node.names)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def top_level_modules(root: Path = SRC) -> set[str]:
    return {path.stem for path in root.glob("*.py") if path.name != "__init__.py"}


def group_of(module: str, modules: frozenset[str] = frozenset()) -> str:
    """The node of ``module``: its package, or the top-level module itself, or the facade
    (``actsparse`` and the names it exports, ``from actsparse import X``)."""
    parts = module.split(".")
    if len(parts) == 1:
        return FACADE
    if parts[1] in PACKAGES or parts[1] in modules:
        return parts[1]
    return FACADE


def package_graph(root: Path = SRC) -> dict[str, dict[str, list[str]]]:
    """``{group: {imported group: ["module -> import", ...]}}`` over every source file under ``root``."""
    graph: dict[str, dict[str, list[str]]] = {}
    modules = frozenset(top_level_modules(root))
    for path in sorted(root.rglob("*.py")):
        source = module_name(path, root)
        here = group_of(source, modules)
        graph.setdefault(here, {})
        for target in sorted(imports_of(path, root)):
            there = group_of(target, modules)
            if there != here:
                graph[here].setdefault(there, []).append(f"{source} -> {target}")
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one group (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, {}):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _explain(graph, component) -> str:
    return "\n".join(f"  {a} -> {b}: {', '.join(graph[a][b][:3])}" for a in component for b in graph[a] if b in component)


def test_there_is_no_import_cycle_between_the_layers():
    graph = package_graph()
    assert PACKAGES | BASE | {"config", "selection", "sparsify", "pipeline"} <= set(graph), (
        "a package or module is missing from the graph: the walk over the sources is broken"
    )
    found = cycles(graph)
    assert not found, "import cycles between layers:\n" + "\n".join(_explain(graph, c) for c in found)


def test_kernels_import_nothing_of_actsparse_outside_kernels():
    outside = {
        f"{path.name}: {target}"
        for path in (SRC / "kernels").rglob("*.py")
        for target in imports_of(path)
        if not target.startswith("actsparse.kernels.")
    }
    assert not outside, f"kernels/ is a leaf (tensors and ints in, tensors out): {sorted(outside)}"


def test_the_bottom_layer_imports_only_itself():
    graph = package_graph()
    for module in BASE:
        assert set(graph[module]) <= BASE, graph[module]
    assert set(graph["models"]) <= BASE, graph["models"]


def test_no_module_imports_the_facade_or_through_it():
    """``from actsparse import validate`` reads as an import of the package's ``__init__``: modules
    import what they use from the module that defines it (``import actsparse.validate as validate``)."""
    through = {
        f"{module_name(path)}: from actsparse import {alias.name}"
        for path in SRC.rglob("*.py")
        if path.name != "__init__.py" or path.parent != SRC
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.module == "actsparse" and not node.level
        for alias in node.names
    }
    assert not through, sorted(through)


def test_the_facade_is_imported_by_no_layer_but_the_harness():
    graph = package_graph()
    importers = {group for group, targets in graph.items() if FACADE in targets}
    assert importers <= {"harness"}, {g: graph[g][FACADE] for g in importers}


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"a/__init__.py": "", "a/x.py": "from actsparse.b.y import f", "b/__init__.py": "", "b/y.py": "import actsparse.a.x"}, [["a", "b"]]),
        ({"a/__init__.py": "", "a/x.py": "def f():\n    from actsparse.b import y", "b/__init__.py": "", "b/y.py": "from ..a import x"}, [["a", "b"]]),
        ({"a/__init__.py": "", "a/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from actsparse.b.y import Y",
          "b/__init__.py": "", "b/y.py": "from actsparse.a.x import f"}, []),
        ({"a/__init__.py": "", "a/x.py": "import triton\nfrom actsparse.b.y import f", "b/__init__.py": "", "b/y.py": "import torch"}, []),
    ],
)  # fmt: skip
def test_the_checker_sees_cycles_through_function_imports_and_skips_type_checking(tmp_path, monkeypatch, files, expected):
    root = tmp_path / "actsparse"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    monkeypatch.setitem(globals(), "PACKAGES", {"a", "b"})
    assert cycles(package_graph(root)) == expected
