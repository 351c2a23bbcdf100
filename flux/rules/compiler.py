"""Compile each rule once per (id, version, source hash) into its own Lua function.

Loading a rule on its own (``load(src, "=<id>", "t", env)``) is its syntax check, gives Lua
line numbers in the rule's own source, and yields the function used when a rule runs by itself
(after another rule failed on the same event, and when a rule is tested alone).
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from flux.rules.errors import RuleCompileError, RuleError, RuleValidationError
from flux.rules.model import Rule, check_plugins, check_sinks
from flux.rules.sandbox import LuaSandbox

#: ``Rule.compile_key``: id, version and a hash of the Lua source.
CompileKey = tuple[str, int, str]

_PREFIX = "local _ENV = _ENV; "
_MESSAGE = re.compile(r"^(?P<chunk>[^\n:]*):(?P<line>\d+): (?P<text>.*)$", re.DOTALL)


class Location(NamedTuple):
    """A Lua error message split into its chunk name, line number and text."""

    chunk: str | None
    line: int | None
    text: str


def locate(message: str) -> Location:
    """Split ``"<chunk>:<line>: text"``; a message without that prefix is all text."""
    found = _MESSAGE.match(message)
    if not found:
        return Location(None, None, message)
    return Location(found.group("chunk"), int(found.group("line")), found.group("text"))


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule and its standalone Lua function (``fn``), compiled once and cached."""

    rule: Rule
    fn: Any
    compile_seconds: float


def compile_rule(sandbox: LuaSandbox, rule: Rule) -> CompiledRule:
    """Load ``rule`` alone; raise ``RuleCompileError`` with the line in its ``when``/``script``."""
    started = time.perf_counter()
    when = rule.when
    source = f"{_PREFIX}return ({when}\n)" if when is not None else _PREFIX + rule.source
    fn, err = sandbox.compile(source, "=" + rule.id)
    elapsed = time.perf_counter() - started
    if fn is None:
        raise _compile_error(rule, err or "compile error")
    return CompiledRule(rule=rule, fn=fn, compile_seconds=elapsed)


def _compile_error(rule: Rule, message: str) -> RuleCompileError:
    """Name the line of the rule's source, and of its file when it came from one."""
    _chunk, line, text = locate(message)
    if line is not None:
        line = min(line, rule.source.count("\n") + 1)
    file_line = (
        rule.origin_line + line - 1 if rule.origin_line is not None and line is not None else None
    )
    return RuleCompileError(
        f"{rule.kind} does not compile: {text}",
        rule_id=rule.id,
        line=line,
        file=rule.origin,
        file_line=file_line,
    )


def validate_rule(
    sandbox: LuaSandbox,
    rule: Rule,
    known_plugins: Collection[str] | None,
    known_sinks: Collection[str] | None = None,
) -> None:
    """Raise ``RuleValidationError``/``RuleCompileError`` if ``rule`` cannot go live.

    ``known_plugins=None`` leaves plugin actions unchecked, ``known_sinks=None`` forwards.
    """
    if known_plugins is not None:
        check_plugins(rule, known_plugins)
    check_sinks(rule, known_sinks)
    compile_rule(sandbox, rule)


class CompileCache:
    """Compiled rules keyed by ``Rule.compile_key``; ``retain`` forgets unused keys."""

    def __init__(self, sandbox: LuaSandbox) -> None:
        self._sandbox = sandbox
        self._cache: dict[CompileKey, CompiledRule] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, rule: Rule) -> CompiledRule:
        """Return the compiled form of ``rule``, compiling it on first use."""
        key = rule.compile_key
        hit = self._cache.get(key)
        if hit is not None:
            self.hits += 1
            if hit.rule is not rule:
                hit = CompiledRule(rule=rule, fn=hit.fn, compile_seconds=hit.compile_seconds)
            return hit
        compiled = compile_rule(self._sandbox, rule)
        self.misses += 1
        self._cache[key] = compiled
        return compiled

    def retain(self, keys: Iterable[CompileKey]) -> None:
        """Forget every compiled rule whose key is not in ``keys``."""
        keep = set(keys)
        for key in [key for key in self._cache if key not in keep]:
            del self._cache[key]


@dataclass(frozen=True, slots=True)
class CompiledRules:
    """A rule set through the cache: what goes live, what is disabled, what was left out."""

    compiled: list[CompiledRule]
    disabled: list[Rule]
    errors: list[RuleError]
    fresh: int
    reused: int

    def keys(self) -> list[CompileKey]:
        """Return the compile keys of every rule kept, live or disabled."""
        return [c.rule.compile_key for c in self.compiled] + [r.compile_key for r in self.disabled]


def compile_rules(
    cache: CompileCache,
    rules: Sequence[Rule],
    known_plugins: Collection[str],
    known_sinks: Collection[str] | None = None,
) -> CompiledRules:
    """Check and compile ``rules``; a duplicate id or a bad rule is an error, the rest are kept."""
    hits, misses = cache.hits, cache.misses
    compiled: list[CompiledRule] = []
    disabled: list[Rule] = []
    errors: list[RuleError] = []
    seen: set[str] = set()
    for rule in rules:
        if rule.id in seen:
            errors.append(RuleValidationError(f"duplicate rule id {rule.id!r}", rule_id=rule.id))
            continue
        seen.add(rule.id)
        try:
            check_plugins(rule, known_plugins)
            check_sinks(rule, known_sinks)
            item = cache.get(rule)
        except RuleError as exc:
            errors.append(exc)
            continue
        if rule.enabled:
            compiled.append(item)
        else:
            disabled.append(rule)
    return CompiledRules(
        compiled=compiled,
        disabled=disabled,
        errors=errors,
        fresh=cache.misses - misses,
        reused=cache.hits - hits,
    )


__all__ = [
    "CompileCache",
    "CompileKey",
    "CompiledRule",
    "CompiledRules",
    "Location",
    "compile_rule",
    "compile_rules",
    "locate",
    "validate_rule",
]
