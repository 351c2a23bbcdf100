"""The package's shape: each third-party library's private parts behind one adapter."""

from __future__ import annotations

import ast
from pathlib import Path

FLUX = Path(__file__).resolve().parents[2] / "flux"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports: at the top, inside functions, under TYPE_CHECKING."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_gmqtt_is_used_through_its_adapter_only() -> None:
    users = {
        str(path.relative_to(FLUX))
        for path in FLUX.rglob("*.py")
        if any(name == "gmqtt" or name.startswith("gmqtt.") for name in imported_modules(path))
    }
    assert users == {"ingest/_gmqtt.py"}
