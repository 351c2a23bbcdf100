"""One version of the compiled rules, fused into batch functions, with its topic plans.

The ``when`` expressions of up to ``GROUP_SIZE`` rules are inlined in one generated Lua function
that loops over the whole batch (one Python->Lua call per group per batch). Inlining is safe
because each expression was proven to parse alone between ``(`` and ``\\n)``, so it is one
expression in both places, and every internal local of the generated function (all named
``__fx_*``) plus ``_ENV`` is shadowed around each expression, so a rule cannot see or change
another rule's data or the budget. ``script`` rules are called as their own function from the
fused loop.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flux.rules.compiler import CompiledRule, locate
from flux.rules.model import Rule
from flux.rules.sandbox import METER_SHIFT, RULE_CODE, LuaSandbox
from flux.rules.state import fingerprint
from flux.topics import TopicMatcher

#: Rules inlined in one generated Lua function.
GROUP_SIZE = 200
#: Topics whose plan is remembered; beyond that the memo starts again.
_TOPIC_PLANS = 65_536

_CHUNK_ARGS = (
    "__fx_V, __fx_VMT, __fx_MSGMT, __fx_meter, __fx_POS, __fx_state, __fx_functions,"
    " __fx_masks, __fx_type, __fx_E"
)
_PARAMS = "__fx_batch, __fx_n, __fx_from, __fx_codes, __fx_outputs"
_LOOP_LOCALS = "__fx_matched, __fx_i, __fx_base, __fx_payload, __fx_device, __fx_mask"
#: The generated function's own names, hidden from the rules inlined in it.
INTERNAL_NAMES = tuple(
    name.strip() for name in f"{_CHUNK_ARGS}, {_PARAMS}, {_LOOP_LOCALS}".split(",")
)
_SHADOW = ", ".join(("_ENV", *INTERNAL_NAMES))
_HEADER = (
    f"local {_CHUNK_ARGS} = ...",
    f"return function({_PARAMS}, ...)",
    "local __fx_matched = #__fx_codes",
    "for __fx_i = __fx_from, __fx_n do",
    "local __fx_base = (__fx_i - 1) * 5",
    "local __fx_payload = __fx_batch[__fx_base + 1]",
    "local __fx_device = __fx_batch[__fx_base + 3]",
    "__fx_VMT.__index = __fx_payload; __fx_MSGMT.__index = __fx_payload",
    "__fx_V.topic = __fx_batch[__fx_base + 2]; __fx_V.device_id = __fx_device; "
    "__fx_V.received_at = __fx_batch[__fx_base + 4]",
    "local __fx_mask = __fx_masks[__fx_batch[__fx_base + 5]]",
    "__fx_POS[1] = __fx_i; __fx_meter[1] = 0",
)
_FOOTER = ("end", "return __fx_matched", "end")


def _group_chunkname(version: int, group: int) -> str:
    return f"__fx_ruleset{version}_{group}"


class _GroupSource:
    """Lua source being generated, and the line each rule's ``when`` starts on."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.starts: dict[int, int] = {}
        self._line = 1

    def emit(self, *texts: str) -> None:
        for text in texts:
            self.lines.append(text)
            self._line += text.count("\n") + 1

    def mark(self, rule_index: int) -> None:
        self.starts[rule_index] = self._line


def _emit_rule(out: _GroupSource, rule_index: int, rule: Rule, state_prefix: str) -> None:
    """Emit one rule's block: set the meter, evaluate, record a match (and a script's output)."""
    out.emit(f"if __fx_mask[{rule_index}] then", f"__fx_meter[1] = {rule_index * METER_SHIFT}")
    if rule.uses_state:
        out.emit(f'__fx_V.state = __fx_state("{state_prefix}{rule.id}", __fx_device)')
    if rule.when is not None:
        out.emit("local __fx_value", f"do local {_SHADOW} = __fx_E")
        out.mark(rule_index)
        out.emit(f"__fx_value = ({rule.when}\n)", "end")
    else:
        out.emit(f"local __fx_value = __fx_functions[{rule_index}]()")
    if rule.uses_state:
        out.emit("__fx_V.state = nil")
    out.emit(
        "if __fx_value then __fx_matched = __fx_matched + 1",
        f"__fx_codes[__fx_matched] = __fx_i * {RULE_CODE} + {rule_index}",
    )
    if rule.script is not None:
        out.emit(
            'if __fx_type(__fx_value) == "table" then __fx_outputs[__fx_matched] = __fx_value end'
        )
    out.emit("end", "end")


def generate_group(
    rules: Sequence[tuple[int, Rule]], state_prefix: str = ""
) -> tuple[str, dict[int, int]]:
    """Return the Lua source of one fused group and, per rule index, its expression's first line."""
    out = _GroupSource()
    out.emit(*_HEADER)
    for rule_index, rule in rules:
        _emit_rule(out, rule_index, rule, state_prefix)
    out.emit(*_FOOTER)
    return "\n".join(out.lines), out.starts


@dataclass(slots=True)
class Group:
    """One fused Lua function covering rule indices ``first..last`` (1-based, inclusive)."""

    chunkname: str
    first: int
    last: int
    fused: bool
    starts: dict[int, int] = field(default_factory=dict)


class Ruleset:
    """One version of the compiled rules, the snapshot each batch is evaluated against.

    Its rules never change; evaluation changes only the per-topic plans, the Lua masks (a
    quarantined rule is masked out) and the consecutive-failure counters. Rules are numbered
    from 1 in the order given (their *index*), as Lua sees them.
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
        self.quarantine_after = quarantine_after
        self.compiled = tuple(compiled)
        self.rules = tuple(c.rule for c in self.compiled)
        self.has_scripts = any(rule.script is not None for rule in self.rules)
        self.index = {rule.id: number for number, rule in enumerate(self.rules, start=1)}
        self.quarantined: set[int] = {self.index[id_] for id_ in quarantined if id_ in self.index}
        # A window rule's ``when`` runs on the windows it closes, which the engine hands in as
        # events on an internal topic no message can carry (a NUL and a per-ruleset token).
        token = secrets.token_hex(8)
        #: Per window rule id, the internal topic its closed windows are evaluated on.
        self.window_topics = {
            rule.id: f"\x00window:{token}/{rule.id}" for rule in self.rules if rule.window
        }
        self.matcher = TopicMatcher([self.window_topics.get(r.id, r.topic) for r in self.rules])
        self.plan_rules: dict[int, tuple[int, ...]] = {}
        self._plans: dict[tuple[int, ...], int] = {}
        self._topic_plan: dict[str, tuple[int, tuple[int, ...]]] = {}
        self._functions = sandbox.table([c.fn for c in self.compiled])
        self._masks = sandbox.table({})
        self._consecutive = sandbox.table([0] * len(self.rules))
        self._ids = sandbox.table([state_prefix + rule.id for rule in self.rules])
        #: Whether a rule keeps per-device ``state`` (its changes are written back).
        self.stateful = any(rule.uses_state for rule in self.rules)
        #: Rule id -> what its state depends on (``flux.rules.state.fingerprint``).
        self.fingerprints = {rule.id: fingerprint(rule) for rule in self.rules}
        self.groups: list[Group] = []
        lua_groups = [self._group(first, fuse, state_prefix) for first in self._group_starts()]
        #: The ruleset as the Lua host's ``run`` takes it.
        self.lua = self._host_table(lua_groups)
        self._chunks = {group.chunkname: group for group in self.groups}

    @property
    def active_count(self) -> int:
        """Return how many rules are evaluated (not quarantined)."""
        return len(self.rules) - len(self.quarantined)

    def _group_starts(self) -> range:
        return range(1, len(self.rules) + 1, GROUP_SIZE)

    def _group(self, first: int, fuse: bool, state_prefix: str) -> Any:
        """Build the Lua function of the group starting at rule ``first``; fall back to generic."""
        last = min(len(self.rules), first + GROUP_SIZE - 1)
        chunkname = _group_chunkname(self.version, len(self.groups) + 1)
        fn = None
        starts: dict[int, int] = {}
        if fuse:
            members = [(index, self.rules[index - 1]) for index in range(first, last + 1)]
            source, starts = generate_group(members, state_prefix)
            chunk, _err = self.sandbox.compile(source, "=" + chunkname)
            if chunk is not None:
                fn = self.sandbox.host.instantiate(chunk, self._functions, self._masks)
        fused = fn is not None
        if fn is None:
            fn = self.sandbox.host.generic_group(
                self._functions, self._masks, first, last, self._ids, *self._kinds()
            )
        self.groups.append(Group(chunkname, first, last, fused, starts))
        return self.sandbox.table([fn, first, last])

    def _kinds(self) -> tuple[Any, Any]:
        """Return, per rule index, whether it uses ``state`` and whether it is a ``when``."""
        table = self.sandbox.table
        return (
            table([rule.uses_state for rule in self.rules]),
            table([rule.when is not None for rule in self.rules]),
        )

    def _host_table(self, lua_groups: list[Any]) -> Any:
        uses_state, is_when = self._kinds()
        return self.sandbox.table(
            {
                "functions": self._functions,
                "masks": self._masks,
                "consecutive": self._consecutive,
                "quarantine_after": self.quarantine_after,
                "ids": self._ids,
                "uses_state": uses_state,
                "is_when": is_when,
                "groups": self.sandbox.table(lua_groups),
            }
        )

    def plan(self, topic: str) -> tuple[int, tuple[int, ...]]:
        """Return ``(plan id, rule indices)`` for ``topic``; plan id 0 means no rule applies."""
        hit = self._topic_plan.get(topic)
        if hit is not None:
            return hit
        matching = (found + 1 for found in self.matcher.match(topic))
        indices = tuple(index for index in matching if index not in self.quarantined)
        result = (self._plan_id(indices), indices) if indices else (0, ())
        if len(self._topic_plan) >= _TOPIC_PLANS:
            self._topic_plan.clear()
        self._topic_plan[topic] = result
        return result

    def _plan_id(self, indices: tuple[int, ...]) -> int:
        """Return the plan of these rule indices, giving Lua its mask the first time."""
        plan_id = self._plans.get(indices)
        if plan_id is None:
            plan_id = len(self._plans) + 1
            self._plans[indices] = plan_id
            self.plan_rules[plan_id] = indices
            self._masks[plan_id] = self.sandbox.table(dict.fromkeys(indices, True))
        return plan_id

    def consecutive_failures(self, rule_index: int) -> int:
        """Return how many times in a row rule ``rule_index`` has failed."""
        return int(self._consecutive[rule_index] or 0)

    def quarantine(self, rule_index: int) -> None:
        """Mask rule ``rule_index`` out of every plan (Lua already did for plans it knew)."""
        self.quarantined.add(rule_index)
        self._topic_plan.clear()
        for mask in self._masks.values():
            mask[rule_index] = False

    def unquarantine(self, rule_index: int) -> bool:
        """Put rule ``rule_index`` back into every plan; return whether it was quarantined."""
        if rule_index not in self.quarantined:
            return False
        self.quarantined.discard(rule_index)
        self._consecutive[rule_index] = 0
        self._reset_plans()
        return True

    def _reset_plans(self) -> None:
        """Forget every plan so they are rebuilt (a new ``plan_rules``: the outcome of a batch
        already evaluated keeps the plans it used)."""
        self._topic_plan.clear()
        self._plans.clear()
        self.plan_rules = {}
        for key in list(self._masks.keys()):
            self._masks[key] = None

    def rule_line(self, rule_index: int, source: Any, line: Any) -> int | None:
        """Map a Lua ``source``/``line`` seen at run time to the line in the rule's source."""
        if not isinstance(line, int) or not isinstance(source, str):
            return None
        rule = self.rules[rule_index - 1]
        if source == "=" + rule.id:
            return line
        group = self._chunks.get(source.removeprefix("="))
        if group is not None and rule_index in group.starts:
            relative = line - group.starts[rule_index] + 1
            if 1 <= relative <= rule.source.count("\n") + 1:
                return relative
        return None

    def message_line(self, rule_index: int, message: str) -> tuple[str, int | None]:
        """Strip the ``chunk:line:`` prefix from a Lua error and map the line into the rule."""
        chunk, line, text = locate(message)
        if chunk is None:
            return message, None
        return text, self.rule_line(rule_index, "=" + chunk, line)


__all__ = ["GROUP_SIZE", "INTERNAL_NAMES", "Group", "Ruleset", "generate_group"]
