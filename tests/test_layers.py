"""The package's shape: no import cycles, each third-party library's private parts behind
one adapter."""

from __future__ import annotations

import ast
from pathlib import Path

FLUX = Path(__file__).resolve().parents[1] / "flux"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports: at the top, inside functions, under TYPE_CHECKING."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def flux_modules() -> dict[str, Path]:
    """``flux``'s modules by dotted name (a package by its own name)."""
    modules: dict[str, Path] = {}
    for path in FLUX.rglob("*.py"):
        parts = list(path.relative_to(FLUX.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Which flux modules each flux module imports. ``from package import submodule`` is an
    edge to the submodule only: its package's ``__init__`` has run before it anyway."""
    modules = flux_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.level:
                    raise AssertionError(f"{path}: use absolute imports")
                subs = {f"{node.module}.{alias.name}" for alias in node.names}
                edges |= subs & modules.keys()
                if len(subs & modules.keys()) < len(subs):
                    edges.add(node.module)
        graph[name] = {edge for edge in edges if edge in modules and edge != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_cycles_and_sees_every_kind_of_import() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    # The store writer imports its PostgreSQL path under TYPE_CHECKING and in a function.
    assert "flux.store.postgres_batch" in graph["flux.store.writer"]
    assert "flux.api" in graph["flux.app"]


def test_gmqtt_is_used_through_its_adapter_only() -> None:
    users = {
        str(path.relative_to(FLUX))
        for path in FLUX.rglob("*.py")
        if any(name == "gmqtt" or name.startswith("gmqtt.") for name in imported_modules(path))
    }
    assert users == {"ingest/_gmqtt.py"}


def test_every_exception_class_lives_in_an_errors_module() -> None:
    """One tree (drawn in flux/errors.py): no exception class defined beside other code."""
    errors_modules = {"errors.py", "rules/errors.py", "plugins/errors.py"}
    elsewhere = []
    for path in FLUX.rglob("*.py"):
        if str(path.relative_to(FLUX)) in errors_modules:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(base, "id", getattr(base, "attr", "")) for base in node.bases}
                if any(base.endswith(("Error", "Exception")) for base in bases):
                    elsewhere.append(f"{path.relative_to(FLUX)}: {node.name}")
    assert elsewhere == []
