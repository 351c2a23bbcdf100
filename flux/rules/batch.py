"""Evaluate a batch of events in Lua; decode the results into matches and failures."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from flux.events import Event
from flux.rules.errors import ERROR_KINDS, RuleError, RuleRuntimeError
from flux.rules.model import Rule
from flux.rules.ruleset import Ruleset
from flux.rules.sandbox import RULE_CODE

_EVENT_SHIFT = RULE_CODE.bit_length() - 1
_RULE_MASK = RULE_CODE - 1
#: Values per failure from the host: event position, rule index, kind, message, source, line.
_FAILURE_FIELDS = 6
#: Largest number of values, and deepest nesting, of a script's output table.
_MAX_OUTPUT_VALUES = 10_000
_MAX_OUTPUT_DEPTH = 32
#: Budget units an evaluation counts for at least: about what the cheapest ``when`` runs.
EVALUATION_FLOOR = 10


class RuleMatch(NamedTuple):
    """A rule matched an event; ``output`` is the table a ``script`` returned (else ``None``)."""

    rule: Rule
    event: Event
    output: dict[str, Any] | None
    ruleset_version: int


@dataclass(frozen=True, slots=True)
class RuleFailure:
    """One failed evaluation: which rule, on which event, what kind, where in the rule's source."""

    rule_id: str
    kind: str
    message: str
    line: int | None
    event_id: str | None
    at: float

    @classmethod
    def now(
        cls, rule_id: str, kind: str, message: str, line: int | None, event: Event | None
    ) -> RuleFailure:
        """Return a failure of ``rule_id`` on ``event`` that happened now."""
        event_id = event.id if event else None
        return cls(rule_id, kind, message, line, event_id, time.time())

    def to_error(self) -> RuleError:
        """Return the matching ``RuleError`` (``RuleTimeout``, ``RuleMemoryError``, ...)."""
        cls = ERROR_KINDS.get(self.kind, RuleRuntimeError)
        return cls(self.message, rule_id=self.rule_id, line=self.line, event_id=self.event_id)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready description."""
        return {
            "rule_id": self.rule_id,
            "kind": self.kind,
            "message": self.message,
            "line": self.line,
            "event_id": self.event_id,
            "at": self.at,
        }


@dataclass(slots=True)
class BatchOutcome:
    """What one batch did; counts and failures are keyed by rule index (1-based)."""

    matches: list[RuleMatch] = field(default_factory=list)
    failures: list[tuple[int, RuleFailure]] = field(default_factory=list)
    undefined: dict[int, int] = field(default_factory=dict)
    quarantined: list[int] = field(default_factory=list)
    evaluations: dict[int, int] = field(default_factory=dict)
    matched: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0
    #: The part of ``elapsed`` window rules spent on the batch's events, by rule index.
    window_seconds: dict[int, float] = field(default_factory=dict)
    #: Budget units (Lua instructions, sampled, and charged C work) each rule spent.
    work: dict[int, int] = field(default_factory=dict)
    #: What the batch was evaluated from, kept for rule traces: the events some rule applied
    #: to, their rows as Lua got them (the fifth value of each is its plan) and the rules of
    #: each plan.
    chosen: list[Event] = field(default_factory=list)
    rows: list[Any] = field(default_factory=list)
    plan_rules: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def seconds_by_rule(self) -> dict[int, float]:
        """Split ``elapsed`` among the rules by the work each did.

        A rule's share is its sampled budget units plus ``EVALUATION_FLOOR`` per evaluation
        (a rule cheaper than one sampling tick still costs something); the shares add up to
        ``elapsed``.
        """
        weights = {
            rule_index: self.work.get(rule_index, 0) + EVALUATION_FLOOR * count
            for rule_index, count in self.evaluations.items()
        }
        total = sum(weights.values())
        windows = self.window_seconds
        lua = self.elapsed - sum(windows.values())
        shares = {index: lua * w / total for index, w in weights.items()} if total else {}
        for rule_index, seconds in windows.items():
            shares[rule_index] = shares.get(rule_index, 0.0) + seconds
        return shares


def evaluate(ruleset: Ruleset, events: Sequence[Event]) -> BatchOutcome:
    """Evaluate ``events`` against every rule of ``ruleset`` whose topic filter matches.

    Matches come in event order, then rule order. Runs on the ruleset's Lua thread.
    """
    outcome = BatchOutcome()
    started = time.perf_counter()
    chosen, rows, plans = _encode(ruleset, events)
    if not chosen:
        return outcome
    sandbox = ruleset.sandbox
    codes, outputs, failures, undefined, quarantined, work = sandbox.host.run(
        ruleset.lua, sandbox.table(rows), len(chosen), sandbox.table(list(plans))
    )
    outcome.elapsed = time.perf_counter() - started
    outcome.work = dict(work.items())
    outcome.chosen, outcome.rows, outcome.plan_rules = chosen, rows, ruleset.plan_rules
    _count_evaluations(outcome, ruleset, plans)
    _decode_matches(outcome, ruleset, chosen, list(codes.values()), outputs)
    _decode_failures(outcome, ruleset, chosen, list(failures.values()))
    outcome.undefined = dict(undefined.items())
    outcome.quarantined = list(quarantined.values())
    for rule_index in outcome.quarantined:
        ruleset.quarantine(rule_index)
    return outcome


def _encode(
    ruleset: Ruleset, events: Sequence[Event]
) -> tuple[list[Event], list[Any], dict[int, int]]:
    """Return the events some rule applies to, their rows for Lua, and the events per plan.

    A row is five values: payload table, topic, device id, received_at, plan id.
    """
    chosen: list[Event] = []
    rows: list[Any] = []
    plans: dict[int, int] = {}
    tables: dict[int, Any] = {}
    to_lua = ruleset.sandbox.runtime.table_from
    plan = ruleset.plan
    for event in events:
        plan_id, _indices = plan(event.topic)
        if plan_id:
            chosen.append(event)
            # One table per payload object: rules cannot modify it, so events sharing a payload
            # share its table.
            payload = event.payload
            table = tables.get(id(payload))
            if table is None:
                # lupa's recursive conversion turns a repeated reference to one dict into an
                # empty table. Payloads decoded from JSON never share nested objects; a derived
                # one may, so it is copied through JSON first.
                safe = payload if event.source != "derived" else orjson.loads(orjson.dumps(payload))
                table = tables[id(payload)] = to_lua(safe, recursive=True)
            rows.extend((table, event.topic, event.device_id, event.received_at, plan_id))
            plans[plan_id] = plans.get(plan_id, 0) + 1
    return chosen, rows, plans


def _count_evaluations(outcome: BatchOutcome, ruleset: Ruleset, plans: dict[int, int]) -> None:
    evaluations = outcome.evaluations
    for plan_id, count in plans.items():
        for rule_index in ruleset.plan_rules[plan_id]:
            evaluations[rule_index] = evaluations.get(rule_index, 0) + count


def _decode_matches(
    outcome: BatchOutcome, ruleset: Ruleset, chosen: list[Event], codes: list[int], outputs: Any
) -> None:
    """Turn match codes (and scripts' output tables) into ``RuleMatch``es; a bad output fails."""
    numbered = list(enumerate(codes, start=1))
    if len(ruleset.groups) > 1:
        numbered.sort(key=lambda item: item[1])  # each group adds its own: back to event order
    by_position = dict(outputs.items()) if ruleset.has_scripts else {}
    rules, version = ruleset.rules, ruleset.version
    matches, matched = outcome.matches, outcome.matched
    for position, code in numbered:
        rule_index = code & _RULE_MASK
        rule = rules[rule_index - 1]
        event = chosen[(code >> _EVENT_SHIFT) - 1]
        output: dict[str, Any] | None = None
        raw = by_position.get(position)
        if raw is not None:
            try:
                output = _output(raw)
            except ValueError as exc:
                failure = RuleFailure.now(rule.id, "runtime", f"bad output: {exc}", None, event)
                outcome.failures.append((rule_index, failure))
                continue
        matches.append(RuleMatch(rule, event, output, version))
        matched[rule_index] = matched.get(rule_index, 0) + 1


def _decode_failures(
    outcome: BatchOutcome, ruleset: Ruleset, chosen: list[Event], values: list[Any]
) -> None:
    """Turn the host's failure records into ``RuleFailure``s, lines mapped into each rule."""
    for at in range(0, len(values), _FAILURE_FIELDS):
        position, rule_index, kind, message, source, line = values[at : at + _FAILURE_FIELDS]
        text, mapped = ruleset.message_line(rule_index, str(message))
        if mapped is None:
            mapped = ruleset.rule_line(rule_index, source, line)
        rule_id = ruleset.rules[rule_index - 1].id
        failure = RuleFailure.now(rule_id, str(kind), text, mapped, chosen[position - 1])
        outcome.failures.append((rule_index, failure))


def _output(raw: Any) -> dict[str, Any]:
    """Return a script's output table as a dict; a list becomes ``{"values": [...]}``."""
    converted = to_python(raw)
    return converted if isinstance(converted, dict) else {"values": converted}


def to_python(value: Any, *, depth: int = 0, budget: list[int] | None = None) -> Any:
    """Convert a Lua value (output table) to JSON-ready Python: dict, list, str, number, bool."""
    if budget is None:
        budget = [_MAX_OUTPUT_VALUES]
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"output has more than {_MAX_OUTPUT_VALUES} values")
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if depth >= _MAX_OUTPUT_DEPTH:
        raise ValueError(f"output is nested deeper than {_MAX_OUTPUT_DEPTH} tables")
    try:
        items = list(value.items())
    except (AttributeError, TypeError):
        raise ValueError(f"output contains a {type(value).__name__}") from None
    if not items:
        return {}
    if _is_sequence([key for key, _ in items]):
        ordered = sorted(items, key=lambda item: item[0])
        return [to_python(v, depth=depth + 1, budget=budget) for _, v in ordered]
    return {str(key): to_python(v, depth=depth + 1, budget=budget) for key, v in items}


def _is_sequence(keys: list[Any]) -> bool:
    """Return whether ``keys`` are exactly 1..n, i.e. the table is a Lua sequence."""
    integers = all(isinstance(key, int) and not isinstance(key, bool) for key in keys)
    return integers and sorted(keys) == list(range(1, len(keys) + 1))


__all__ = ["EVALUATION_FLOOR", "BatchOutcome", "RuleFailure", "RuleMatch", "evaluate", "to_python"]
