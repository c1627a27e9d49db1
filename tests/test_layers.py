"""Layering: imports flow cli/tools -> stages (encoder, decoder, verify, serve) -> core and store, with no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the package splitvlm
FOLDERS = ("core", "store", "encoder", "decoder", "verify", "serve", "cli", "tools")
ABOVE_CORE = ("splitvlm.encoder", "splitvlm.decoder", "splitvlm.verify", "splitvlm.serve", "splitvlm.cli",
              "splitvlm.tools")
FORBIDDEN = {  # folder: the splitvlm packages its modules must not import
    "decoder": ("splitvlm.encoder", "splitvlm.verify", "splitvlm.serve"),
    "encoder": ("splitvlm.decoder", "splitvlm.verify", "splitvlm.serve"),
    "verify": ("splitvlm.encoder", "splitvlm.serve"),
    "serve": ("splitvlm.encoder", "splitvlm.decoder", "splitvlm.verify", "splitvlm.cli", "splitvlm.tools"),
    "core": ABOVE_CORE,
    "store": ABOVE_CORE,
}


def module_name(path: Path) -> str:
    """splitvlm.x.y for ROOT/x/y.py; a package's __init__.py is the package."""
    parts = ["splitvlm", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in [ROOT / "__init__.py", ROOT / "__main__.py",
                                       *(p for f in FOLDERS for p in sorted((ROOT / f).rglob("*.py")))]}


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Every import at any depth (in functions too), except under `if TYPE_CHECKING:`."""

    def __init__(self, package: str):
        self.package, self.found = package, set()

    def visit_If(self, node: ast.If) -> None:
        if not _type_checking(node.test):
            self.generic_visit(node)
            return
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            base = ".".join([*parts[:len(parts) - node.level + 1], *([base] if base else [])])
        for alias in node.names:  # `from p import m` imports the module p.m when there is one
            sub = f"{base}.{alias.name}"
            self.found.add(sub if sub in MODULES else base)


def imports_of(source: str, name: str, is_package: bool = False) -> set[str]:
    """The splitvlm modules that module `name` (of this source) imports."""
    visitor = _Imports(name if is_package else name.rpartition(".")[0])
    visitor.visit(ast.parse(source))
    return {m for m in visitor.found if m == "splitvlm" or m.startswith("splitvlm.")}


GRAPH = {name: imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
         for name, path in MODULES.items()}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_parser_sees_function_imports_and_skips_type_checking():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from splitvlm.store.store import X\n"
              "def f():\n    from splitvlm.core.engine import Engine\n    from . import key\n")
    assert imports_of(source, "splitvlm.store.walk") == {"splitvlm.core.engine", "splitvlm.store.key"}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_upward_or_sideways_imports(folder):
    bad = [f"{name} imports {m}" for name, found in sorted(GRAPH.items()) if within(name, f"splitvlm.{folder}")
           for m in sorted(found) if any(within(m, p) for p in FORBIDDEN[folder])
           or (folder in ("core", "store") and m == "splitvlm")]  # the top package reaches every stage
    assert not bad, "; ".join(bad)


def test_store_uses_only_core_errors():
    bad = [f"{name} imports {m}" for name, found in sorted(GRAPH.items()) if within(name, "splitvlm.store")
           for m in sorted(found) if within(m, "splitvlm.core") and m != "splitvlm.core.errors"]
    assert not bad, "; ".join(bad)


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in sorted(GRAPH.get(name, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(GRAPH):
        if name not in state and (cycle := visit(name)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_batching_helpers():
    from splitvlm.core.batching import by_budget, chunks

    assert [list(r) for r in chunks(5, 2)] == [[0, 1], [2, 3], [4]] and list(chunks(0, 3)) == []
    assert list(by_budget([3, 4, 9, 1, 1, 2], lambda x: x, 7)) == [[3, 4], [9], [1, 1, 2]]
    assert list(by_budget([], lambda x: x, 7)) == []
