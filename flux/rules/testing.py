"""Test one rule against a sample payload, apart from the live ruleset and its state."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

from flux.events import Event, device_id_for, new_event_id
from flux.rules.batch import BatchOutcome, evaluate
from flux.rules.compiler import CompiledRule, compile_rule
from flux.rules.errors import RuleError, RuleValidationError
from flux.rules.model import Rule
from flux.rules.ruleset import Ruleset
from flux.rules.sandbox import LuaSandbox

#: Numbers the state of each test run, so it never meets a live rule's or another test's.
_runs = itertools.count(1)


@dataclass(frozen=True, slots=True)
class RuleTestResult:
    """The outcome of evaluating one rule against one sample payload."""

    rule_id: str
    matched: bool
    output: dict[str, Any] | None
    elapsed_s: float
    error: RuleError | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready description."""
        return {
            "rule_id": self.rule_id,
            "matched": self.matched,
            "output": self.output,
            "elapsed_s": self.elapsed_s,
            "error": self.error.to_dict() if self.error else None,
        }


def sample_topic(rule: Rule, device_id: str | None = None) -> str:
    """Return a topic the rule's filter matches: ``+`` is the device, ``#`` is ``test``."""
    levels = [
        device_id or "test-device" if level == "+" else level for level in rule.topic.split("/")
    ]
    return "/".join("test" if level == "#" else level for level in levels)


def sample_event(
    payload: dict[str, Any], topic: str, device_id: str | None, received_at: float | None
) -> Event:
    """Return the event a test evaluates, as if it had arrived over HTTP."""
    return Event(
        id=new_event_id(),
        topic=topic,
        device_id=device_id or device_id_for(topic, payload),
        payload=payload,
        raw=b"",
        received_at=time.time() if received_at is None else received_at,
        source="http",
    )


def run_test(
    sandbox: LuaSandbox,
    rule: Rule,
    payload: dict[str, Any],
    *,
    topic: str | None = None,
    device_id: str | None = None,
    state: dict[str, Any] | None = None,
    received_at: float | None = None,
    fuse: bool = True,
) -> RuleTestResult:
    """Evaluate ``rule`` once against ``payload`` (a compile error is returned, not raised).

    The rule runs with its own empty ``state`` (seeded from ``state``), never the live one.
    Runs on the sandbox's Lua thread.
    """
    if topic is None:
        topic = sample_topic(rule, device_id)
    event = sample_event(payload, topic, device_id, received_at)
    started = time.perf_counter()
    try:
        compiled = compile_rule(sandbox, rule)
    except RuleError as exc:
        return RuleTestResult(rule.id, False, None, time.perf_counter() - started, exc)
    outcome = _evaluate_alone(sandbox, compiled, event, state, fuse)
    return _result(rule, topic, outcome, time.perf_counter() - started)


def _evaluate_alone(
    sandbox: LuaSandbox,
    compiled: CompiledRule,
    event: Event,
    state: dict[str, Any] | None,
    fuse: bool,
) -> BatchOutcome:
    """Evaluate one rule in a ruleset of its own, under a state name no other run uses."""
    prefix = f"\x00test{next(_runs)}:"
    state_id = prefix + compiled.rule.id
    try:
        if state:
            sandbox.host.seed_state(state_id, event.device_id, sandbox.table(state))
        ruleset = Ruleset(
            sandbox=sandbox,
            version=0,
            compiled=[compiled],
            quarantine_after=1,
            fuse=fuse,
            state_prefix=prefix,
        )
        return evaluate(ruleset, [event])
    finally:
        sandbox.host.drop_state(state_id)
        sandbox.host.take_state_changes()  # a test's state is never written back


def _result(rule: Rule, topic: str, outcome: BatchOutcome, elapsed: float) -> RuleTestResult:
    if outcome.failures:
        return RuleTestResult(rule.id, False, None, elapsed, outcome.failures[0][1].to_error())
    if not outcome.evaluations:
        error = RuleValidationError(
            f"topic {topic!r} does not match the rule's filter {rule.topic!r}", rule_id=rule.id
        )
        return RuleTestResult(rule.id, False, None, elapsed, error)
    if outcome.matches:
        return RuleTestResult(rule.id, True, outcome.matches[0].output, elapsed)
    return RuleTestResult(rule.id, False, None, elapsed)


__all__ = ["RuleTestResult", "run_test", "sample_event", "sample_topic"]
