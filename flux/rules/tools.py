"""Entry points for the CLI: ``flux rules validate [PATH]`` and ``flux rules test RULE``."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flux.rules.compiler import validate_rule
from flux.rules.engine import RuleEngine
from flux.rules.errors import RuleError, RuleValidationError
from flux.rules.model import Rule, load_rules_path
from flux.rules.sandbox import LuaSandbox
from flux.rules.testing import RuleTestResult, TimedEvent, WindowTestResult

#: Where shipped rule files live, relative to the working directory.
DEFAULT_RULES_PATH = Path("rules")


@dataclass(slots=True)
class ValidationReport:
    """The result of validating rule files: which rules are fine, and every error with its line."""

    files: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    errors: list[RuleError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Return whether every file and rule is valid."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready description."""
        return {
            "ok": self.ok,
            "files": self.files,
            "valid": self.valid,
            "errors": [e.to_dict() for e in self.errors],
        }


def validate_rules(
    path: str | Path = DEFAULT_RULES_PATH, *, known_plugins: Collection[str] | None = None
) -> ValidationReport:
    """Load and compile every rule under ``path`` without running any; report all errors.

    With ``known_plugins`` (``None`` = do not check), plugin actions are checked too.
    """
    loaded = load_rules_path(path)
    report = ValidationReport(files=loaded.files, errors=list(loaded.errors))
    sandbox = LuaSandbox()
    for rule in loaded.rules:
        try:
            validate_rule(sandbox, rule, known_plugins)
        except RuleError as exc:
            exc.fields.setdefault("file", rule.origin)
            report.errors.append(exc)
        else:
            report.valid.append(rule.id)
    return report


def find_rule(rule_id: str, path: str | Path = DEFAULT_RULES_PATH) -> Rule:
    """Return the rule ``rule_id`` from the files under ``path``."""
    loaded = load_rules_path(path)
    for rule in loaded.rules:
        if rule.id == rule_id:
            return rule
    for error in loaded.errors:
        if error.rule_id == rule_id:
            raise error
    raise RuleValidationError(f"no rule {rule_id!r} under {path}", rule_id=rule_id)


async def run_rule_test_async(
    rule: Rule | str,
    payload: dict[str, Any],
    *,
    topic: str | None = None,
    path: str | Path = DEFAULT_RULES_PATH,
    state: dict[str, Any] | None = None,
) -> RuleTestResult:
    """Evaluate one rule (a ``Rule`` or an id looked up under ``path``) against ``payload``."""
    if isinstance(rule, str):
        rule = find_rule(rule, path)
    async with RuleEngine() as engine:
        return await engine.test_rule(rule, payload, topic, state=state)


def run_rule_test(
    rule: Rule | str,
    payload: dict[str, Any],
    *,
    topic: str | None = None,
    path: str | Path = DEFAULT_RULES_PATH,
    state: dict[str, Any] | None = None,
) -> RuleTestResult:
    """Synchronous ``run_rule_test_async`` for the CLI (must not be called from a running loop)."""
    return asyncio.run(run_rule_test_async(rule, payload, topic=topic, path=path, state=state))


def run_window_rule_test(
    rule: Rule | str,
    events: Sequence[TimedEvent],
    *,
    topic: str | None = None,
    path: str | Path = DEFAULT_RULES_PATH,
    close_open: bool = False,
) -> WindowTestResult:
    """Feed ``events`` to a window rule (a ``Rule`` or an id under ``path``); for the CLI."""
    found = find_rule(rule, path) if isinstance(rule, str) else rule
    if found.window is None:
        raise RuleValidationError(
            f"rule {found.id!r} is not a window rule; use --payload", rule_id=found.id
        )

    async def run() -> WindowTestResult:
        async with RuleEngine() as engine:
            return await engine.test_window_rule(found, events, topic=topic, close_open=close_open)

    return asyncio.run(run())


__all__ = [
    "DEFAULT_RULES_PATH",
    "ValidationReport",
    "find_rule",
    "run_rule_test",
    "run_rule_test_async",
    "run_window_rule_test",
    "validate_rules",
]
