"""Rule traces: the next evaluations of one rule on live traffic, read from real batches.

A trace never evaluates anything again: after each batch the engine hands the batch's
outcome over, and each open trace takes its rule's part of it (the events the rule was
evaluated on, its matches and outputs, its failures, its share of the batch's time). With
no trace open that costs one truth test per batch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from flux.errors import Conflict
from flux.events import Event
from flux.rules.batch import BatchOutcome
from flux.rules.ruleset import Ruleset

#: Traces open at once, over all rules; one more is refused (409).
MAX_TRACES = 32
#: Values per event in a batch's rows (see ``flux.rules.batch._encode``); the last is the plan.
_ROW_VALUES = 5


@dataclass(slots=True)
class _Trace:
    """One open trace: its rule, how many evaluations it wants, what it saw so far."""

    rule_id: str
    count: int
    records: list[dict[str, Any]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, record: dict[str, Any]) -> None:
        if len(self.records) < self.count:
            self.records.append(record)
        if len(self.records) >= self.count:
            self.done.set()


def _event_record(event: Event) -> dict[str, Any]:
    return {
        "event_id": event.id,
        "topic": event.topic,
        "device_id": event.device_id,
        "payload": event.payload,
        "received_at": event.received_at,
        "source": event.source,
    }


class RuleTraces:
    """The open traces; ``record`` feeds them each evaluated batch."""

    def __init__(self) -> None:
        self._open: list[_Trace] = []

    def __bool__(self) -> bool:
        return bool(self._open)

    async def trace(self, rule_id: str, count: int, timeout_s: float) -> dict[str, Any]:
        """Collect the next ``count`` evaluations of ``rule_id``, or what came in ``timeout_s``.

        Raises ``Conflict`` when ``MAX_TRACES`` traces are open already.
        """
        if len(self._open) >= MAX_TRACES:
            raise Conflict(f"{MAX_TRACES} traces are running; try again later", rule_id=rule_id)
        trace = _Trace(rule_id, count)
        self._open.append(trace)
        try:
            await asyncio.wait_for(trace.done.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            self._open.remove(trace)
        return {
            "rule_id": rule_id,
            "count": count,
            "complete": len(trace.records) >= count,
            "evaluations": trace.records,
        }

    def record(self, ruleset: Ruleset, outcome: BatchOutcome) -> None:
        """Give every open trace its rule's evaluations in ``outcome`` (in event order)."""
        for trace in list(self._open):
            rule_index = ruleset.index.get(trace.rule_id)
            if rule_index is not None and not trace.done.is_set():
                self._record(trace, rule_index, outcome)

    @staticmethod
    def _record(trace: _Trace, rule_index: int, outcome: BatchOutcome) -> None:
        evaluations = outcome.evaluations.get(rule_index, 0)
        if not evaluations:
            return
        seconds = outcome.seconds_by_rule().get(rule_index, 0.0)
        time_us = round(seconds / evaluations * 1e6, 3)
        outputs = {m.event.id: m.output for m in outcome.matches if m.rule.id == trace.rule_id}
        failures = {f.event_id: f for index, f in outcome.failures if index == rule_index}
        plan_ids = outcome.rows[_ROW_VALUES - 1 :: _ROW_VALUES]
        # A rule quarantined by this batch was not evaluated after its last failure.
        stop_at = next(reversed(failures)) if rule_index in outcome.quarantined else None
        for event, plan_id in zip(outcome.chosen, plan_ids, strict=True):
            if rule_index not in outcome.plan_rules.get(plan_id, ()):
                continue
            record: dict[str, Any] = {
                "input": _event_record(event),
                "result": "not_matched",
                "output": None,
                "time_us": time_us,
                "error": None,
            }
            failure = failures.get(event.id)
            if failure is not None:
                record["result"] = "error"
                record["error"] = {
                    "kind": failure.kind,
                    "message": failure.message,
                    "line": failure.line,
                }
            elif event.id in outputs:
                record["result"], record["output"] = "matched", outputs[event.id]
            trace.add(record)
            if trace.done.is_set() or event.id == stop_at:
                return


__all__ = ["MAX_TRACES", "RuleTraces"]
