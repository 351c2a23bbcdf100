"""Compile rules once per (id, version, source hash) and fuse a ruleset into batch functions.

Each rule is first loaded on its own (``load(src, "=<id>", "t", env)``): that is the syntax
check, gives Lua line numbers in the rule's own source, and is the function used when a rule
runs by itself (after another rule failed on the same event, and by ``test_rule``).

A ruleset is then fused: the ``when`` expressions of up to ``GROUP_SIZE`` rules are inlined in
one generated Lua function that loops over the whole batch (one Python->Lua call per group per
batch). Inlining is safe because each expression was proven to parse alone between ``(`` and
``\\n)``, so it is one expression in both places, and every internal local of the generated
function (all named ``__fx_*``) plus ``_ENV`` is shadowed around each expression, so a rule
cannot see or change another rule's data or the budget. ``script`` rules are called as their own
function from the fused loop. Measured (10 rules): fused 0.57 us/event against 1.9 us/event
calling one protected function per rule, with the count hook on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flux.rules.errors import RuleCompileError
from flux.rules.model import Rule
from flux.rules.sandbox import LuaSandbox
from flux.topics import TopicMatcher

#: Rules inlined in one generated Lua function.
GROUP_SIZE = 200
#: Matches are reported as ``event_index * RULE_CODE + rule_index`` (so at most 2**20 rules).
RULE_CODE = 1 << 20
_PREFIX = "local _ENV = _ENV; "
_CHUNK_ARGS = (
    "__fx_V, __fx_VMT, __fx_MSGMT, __fx_B, __fx_POS, __fx_state, __fx_S, __fx_M, __fx_type, __fx_E"
)
_PARAMS = "__fx_batch, __fx_n, __fx_i0, __fx_codes, __fx_outs"
_LOOP_LOCALS = "__fx_nm, __fx_i, __fx_b, __fx_p, __fx_dev, __fx_m"
_SHADOW = f"_ENV, {_CHUNK_ARGS}, {_PARAMS}, {_LOOP_LOCALS}"
_MESSAGE = re.compile(r"^(?P<chunk>[^\n:]*):(?P<line>\d+): (?P<text>.*)$", re.DOTALL)


def _group_chunkname(version: int, group: int) -> str:
    return f"__fx_ruleset{version}_{group}"


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule and its standalone Lua function (``fn``), compiled once and cached."""

    rule: Rule
    fn: Any
    compile_seconds: float


def locate(message: str) -> tuple[str, int | None]:
    """Split ``"<chunk>:<line>: text"`` into the text and the line number."""
    found = _MESSAGE.match(message)
    if not found:
        return message, None
    return found.group("text"), int(found.group("line"))


def compile_rule(sandbox: LuaSandbox, rule: Rule) -> CompiledRule:
    """Load ``rule`` alone; raise ``RuleCompileError`` with the line in its ``when``/``script``."""
    started = time.perf_counter()
    when = rule.when
    source = f"{_PREFIX}return ({when}\n)" if when is not None else _PREFIX + rule.source
    fn, err = sandbox.compile(source, "=" + rule.id)
    elapsed = time.perf_counter() - started
    if fn is None:
        text, line = locate(err or "compile error")
        last = rule.source.count("\n") + 1
        if line is not None:
            line = min(line, last)
        file_line = (
            rule.origin_line + line - 1
            if rule.origin_line is not None and line is not None
            else None
        )
        raise RuleCompileError(
            f"{rule.kind} does not compile: {text}",
            rule_id=rule.id,
            line=line,
            file=rule.origin,
            file_line=file_line,
        )
    return CompiledRule(rule=rule, fn=fn, compile_seconds=elapsed)


class CompileCache:
    """Compiled rules keyed by ``Rule.compile_key``; ``retain`` forgets unused keys."""

    def __init__(self, sandbox: LuaSandbox) -> None:
        self._sandbox = sandbox
        self._cache: dict[tuple[str, int, str], CompiledRule] = {}
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

    def retain(self, keys: Iterable[tuple[str, int, str]]) -> None:
        """Forget every compiled rule whose key is not in ``keys``."""
        keep = set(keys)
        for key in [k for k in self._cache if k not in keep]:
            del self._cache[key]


def _generate_group(
    rules: Sequence[tuple[int, Rule]], state_prefix: str = ""
) -> tuple[str, dict[int, int]]:
    """Return the Lua source of one fused group and, per rule index, its expression's first line."""
    out: list[str] = []
    starts: dict[int, int] = {}
    line = 1

    def emit(text: str) -> None:
        nonlocal line
        out.append(text)
        line += text.count("\n") + 1

    for text in (
        f"local {_CHUNK_ARGS} = ...",
        f"return function({_PARAMS}, ...)",
        "local __fx_nm = #__fx_codes",
        "for __fx_i = __fx_i0, __fx_n do",
        "local __fx_b = (__fx_i - 1) * 5",
        "local __fx_p = __fx_batch[__fx_b + 1]",
        "local __fx_dev = __fx_batch[__fx_b + 3]",
        "__fx_VMT.__index = __fx_p; __fx_MSGMT.__index = __fx_p",
        "__fx_V.topic = __fx_batch[__fx_b + 2]; __fx_V.device_id = __fx_dev; "
        "__fx_V.received_at = __fx_batch[__fx_b + 4]",
        "local __fx_m = __fx_M[__fx_batch[__fx_b + 5]]",
        "__fx_POS[1] = __fx_i",
    ):
        emit(text)
    for k, rule in rules:
        emit(f"if __fx_m[{k}] then")
        emit(f"__fx_B[1] = {k << 40}")
        if rule.uses_state:
            emit(f'__fx_V.state = __fx_state("{state_prefix}{rule.id}", __fx_dev)')
        if rule.when is not None:
            emit("local __fx_v")
            emit(f"do local {_SHADOW} = __fx_E")
            starts[k] = line
            emit(f"__fx_v = ({rule.when}\n)")
            emit("end")
        else:
            emit(f"local __fx_v = __fx_S[{k}]()")
        if rule.uses_state:
            emit("__fx_V.state = nil")
        emit("if __fx_v then __fx_nm = __fx_nm + 1")
        emit(f"__fx_codes[__fx_nm] = __fx_i * {RULE_CODE} + {k}")
        if rule.script is not None:
            emit('if __fx_type(__fx_v) == "table" then __fx_outs[__fx_nm] = __fx_v end')
        emit("end")
        emit("end")
    for text in ("end", "return __fx_nm", "end"):
        emit(text)
    return "\n".join(out), starts


@dataclass(slots=True)
class Group:
    """One fused Lua function covering rule indices ``lo..hi`` (1-based, inclusive)."""

    chunkname: str
    lo: int
    hi: int
    fused: bool
    starts: dict[int, int] = field(default_factory=dict)


class Ruleset:
    """One version of the compiled rules, the snapshot each batch is evaluated against.

    Its rules never change; evaluation changes only the per-topic plan cache, the Lua masks
    (a quarantined rule is masked out) and the consecutive-failure counters.
    """

    def __init__(
        self,
        *,
        sandbox: LuaSandbox,
        version: int,
        compiled: Sequence[CompiledRule],
        quarantine_after: int,
        quarantined: Iterable[str] = (),
        fuse: bool = True,
        state_prefix: str = "",
    ) -> None:
        self.sandbox = sandbox
        self.version = version
        self.compiled = tuple(compiled)
        self.rules = tuple(c.rule for c in self.compiled)
        self.has_scripts = any(rule.script is not None for rule in self.rules)
        self.index = {rule.id: k for k, rule in enumerate(self.rules, start=1)}
        self.quarantined: set[int] = {self.index[i] for i in quarantined if i in self.index}
        self.matcher = TopicMatcher([rule.topic for rule in self.rules])
        self._plans: dict[tuple[int, ...], int] = {}
        self._topic_plan: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.plan_rules: dict[int, tuple[int, ...]] = {}
        table = sandbox.table
        n = len(self.rules)
        self.lua_S = table([c.fn for c in self.compiled])
        self.lua_M = table({})
        self.lua_F = table([0] * n)
        self.groups: list[Group] = []
        lua_groups = []
        for g, lo in enumerate(range(1, n + 1, GROUP_SIZE), start=1):
            hi = min(n, lo + GROUP_SIZE - 1)
            chunkname = _group_chunkname(version, g)
            members = [(k, self.rules[k - 1]) for k in range(lo, hi + 1)]
            fn = None
            starts: dict[int, int] = {}
            if fuse:
                source, starts = _generate_group(members, state_prefix)
                chunk, _err = sandbox.compile(source, "=" + chunkname)
                if chunk is not None:
                    fn = sandbox.host.instantiate(chunk, self.lua_S, self.lua_M)
            fused = fn is not None
            if fn is None:
                fn = sandbox.host.generic_group(
                    self.lua_S,
                    self.lua_M,
                    lo,
                    hi,
                    table([state_prefix + r.id for r in self.rules]),
                    table([r.uses_state for r in self.rules]),
                    table([r.when is not None for r in self.rules]),
                )
            self.groups.append(Group(chunkname=chunkname, lo=lo, hi=hi, fused=fused, starts=starts))
            lua_groups.append(table([fn, lo, hi]))
        self.lua = table(
            {
                "S": self.lua_S,
                "M": self.lua_M,
                "F": self.lua_F,
                "QN": quarantine_after,
                "ids": table([state_prefix + r.id for r in self.rules]),
                "uses_state": table([r.uses_state for r in self.rules]),
                "is_when": table([r.when is not None for r in self.rules]),
                "groups": table(lua_groups),
            }
        )
        self._chunks = {g.chunkname: g for g in self.groups}

    def plan(self, topic: str) -> tuple[int, tuple[int, ...]]:
        """Return ``(plan id, rule indices)`` for ``topic``; plan id 0 means no rule applies."""
        hit = self._topic_plan.get(topic)
        if hit is not None:
            return hit
        rules = tuple(i + 1 for i in self.matcher.match(topic) if i + 1 not in self.quarantined)
        result: tuple[int, tuple[int, ...]]
        if not rules:
            result = (0, ())
        else:
            plan_id = self._plans.get(rules)
            if plan_id is None:
                plan_id = len(self._plans) + 1
                self._plans[rules] = plan_id
                self.plan_rules[plan_id] = rules
                self.lua_M[plan_id] = self.sandbox.table({k: True for k in rules})
            result = (plan_id, rules)
        if len(self._topic_plan) >= 65_536:
            self._topic_plan.clear()
        self._topic_plan[topic] = result
        return result

    def reset_plans(self) -> None:
        """Forget every plan (after a rule leaves quarantine) so they are rebuilt."""
        self._topic_plan.clear()
        self._plans.clear()
        self.plan_rules.clear()
        for key in list(self.lua_M.keys()):
            self.lua_M[key] = None

    def quarantine(self, k: int) -> None:
        """Mask rule ``k`` out of every plan (Lua already did for plans it knew)."""
        self.quarantined.add(k)
        self._topic_plan.clear()
        for mask in self.lua_M.values():
            mask[k] = False

    def rule_line(self, k: int, source: Any, line: Any) -> int | None:
        """Map a Lua ``source``/``line`` seen at run time to the line in rule ``k``'s source."""
        if not isinstance(line, int) or not isinstance(source, str):
            return None
        rule = self.rules[k - 1]
        if source == "=" + rule.id:
            return line
        group = self._chunks.get(source.removeprefix("="))
        if group is not None and k in group.starts:
            rel = line - group.starts[k] + 1
            if 1 <= rel <= rule.source.count("\n") + 1:
                return rel
        return None

    def message_line(self, k: int, message: str) -> tuple[str, int | None]:
        """Strip the ``chunk:line:`` prefix from a Lua error and map the line into rule ``k``."""
        found = _MESSAGE.match(message)
        if not found:
            return message, None
        line = self.rule_line(k, "=" + found.group("chunk"), int(found.group("line")))
        return found.group("text"), line


def to_python(value: Any, *, depth: int = 0, budget: list[int] | None = None) -> Any:
    """Convert a Lua value (output table) to JSON-ready Python: dict, list, str, number, bool."""
    if budget is None:
        budget = [10_000]
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError("output has more than 10000 values")
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if depth >= 32:
        raise ValueError("output is nested deeper than 32 tables")
    try:
        items = list(value.items())
    except (AttributeError, TypeError):
        raise ValueError(f"output contains a {type(value).__name__}") from None
    if not items:
        return {}
    keys = [k for k, _ in items]
    if all(isinstance(k, int) and not isinstance(k, bool) for k in keys) and sorted(keys) == list(
        range(1, len(keys) + 1)
    ):
        ordered = sorted(items, key=lambda kv: kv[0])
        return [to_python(v, depth=depth + 1, budget=budget) for _, v in ordered]
    return {str(k): to_python(v, depth=depth + 1, budget=budget) for k, v in items}


__all__ = ["GROUP_SIZE", "CompileCache", "CompiledRule", "Ruleset", "compile_rule", "to_python"]
