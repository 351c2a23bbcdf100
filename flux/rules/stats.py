"""Per-rule status, counters and last error, kept in step with the rules' Prometheus metrics."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flux.rules import metrics
from flux.rules.batch import BatchOutcome, RuleFailure
from flux.rules.compiler import CompiledRule, CompiledRules, CompileKey
from flux.rules.errors import RuleError
from flux.rules.model import Rule
from flux.rules.ruleset import Ruleset

# The engine's logger: the lines about rules keep the name operators filter on.
log = logging.getLogger("flux.rules.engine")

Status = Literal["active", "quarantined", "error", "disabled"]


@dataclass(slots=True)
class RuleStatus:
    """A rule as the API shows it: definition, status and counters since the engine started."""

    id: str
    status: Status
    rule: Rule | None
    evaluations: int = 0
    matches: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready description."""
        return {
            "id": self.id,
            "status": self.status,
            "rule": self.rule.model_dump(mode="json") if self.rule else None,
            "evaluations": self.evaluations,
            "matches": self.matches,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "seconds": round(self.seconds, 6),
        }


@dataclass(slots=True)
class _Counters:
    """One rule's counters, with its labelled metric children looked up once."""

    evaluated: Any
    matched: Any
    evaluations: int = 0
    matches: int = 0
    failures: int = 0
    seconds: float = 0.0
    last_error: RuleFailure | None = None


def _set_gauges(active: int, quarantined: int) -> None:
    metrics.RULES_ACTIVE.set(active)
    metrics.RULES_QUARANTINED.set(quarantined)


class RuleStats:
    """What the engine knows about each rule besides its code: status, counters, last error.

    Quarantine outlives a reload while the rule's compile key stays the same.
    """

    def __init__(self) -> None:
        self._counters: dict[str, _Counters] = {}
        self._disabled: dict[str, Rule] = {}
        self._load_errors: dict[str, RuleError] = {}
        self._quarantined: dict[str, CompileKey] = {}

    # ------------------------------------------------------------------ reloads

    def still_quarantined(self, compiled: Sequence[CompiledRule]) -> set[str]:
        """Return the ids among ``compiled`` quarantined with the same compile key."""
        quarantined = self._quarantined
        return {c.rule.id for c in compiled if quarantined.get(c.rule.id) == c.rule.compile_key}

    def reloaded(self, ruleset: Ruleset, result: CompiledRules) -> None:
        """Take in a new ruleset: statuses, and no counters or metrics for rules now gone."""
        self._load_errors = {e.rule_id: e for e in result.errors if e.rule_id}
        self._disabled = {rule.id: rule for rule in result.disabled}
        self._quarantined = {
            rule.id: rule.compile_key
            for number, rule in enumerate(ruleset.rules, start=1)
            if number in ruleset.quarantined
        }
        known = set(ruleset.index) | set(self._disabled) | set(self._load_errors)
        for rule_id in [rule_id for rule_id in self._counters if rule_id not in known]:
            metrics.forget_rule(rule_id)
            del self._counters[rule_id]
        _set_gauges(ruleset.active_count, len(ruleset.quarantined))

    def unquarantined(self, ruleset: Ruleset, rule_id: str) -> None:
        """Note that ``rule_id`` is back in service."""
        self._quarantined.pop(rule_id, None)
        _set_gauges(ruleset.active_count, len(ruleset.quarantined))
        log.info("rule %s taken out of quarantine", rule_id)

    def restored_quarantine(self, ruleset: Ruleset, rule: Rule) -> None:
        """Note a quarantine read back from the database (it outlives restarts)."""
        self._quarantined[rule.id] = rule.compile_key
        _set_gauges(ruleset.active_count, len(ruleset.quarantined))
        log.warning("rule %s is still quarantined (since before the restart)", rule.id)

    @staticmethod
    def closed() -> None:
        """Note that the engine stopped: no rule is active or quarantined."""
        _set_gauges(0, 0)

    # ------------------------------------------------------------------ batches

    def record(self, ruleset: Ruleset, outcome: BatchOutcome) -> None:
        """Count a batch's evaluations, matches and failures; log failures and quarantines."""
        if outcome.elapsed:
            metrics.RULE_EVAL_SECONDS.observe(outcome.elapsed)
        rules = ruleset.rules
        for rule_index, count in outcome.evaluations.items():
            counters = self._counters_for(rules[rule_index - 1].id)
            counters.evaluations += count
            counters.evaluated.inc(count)
        for rule_index, seconds in outcome.seconds_by_rule().items():
            rule_id = rules[rule_index - 1].id
            self._counters_for(rule_id).seconds += seconds
            metrics.RULE_SECONDS.add(rule_id, seconds)
        for rule_index, count in outcome.matched.items():
            counters = self._counters_for(rules[rule_index - 1].id)
            counters.matches += count
            counters.matched.inc(count)
        for rule_index, failure in outcome.failures:
            self._record_failure(failure, ruleset.consecutive_failures(rule_index))
        for rule_index, count in outcome.undefined.items():
            metrics.RULE_ERRORS.labels(rule=rules[rule_index - 1].id, kind="undefined").inc(count)
        if outcome.quarantined:
            self._record_quarantined(ruleset, outcome.quarantined)

    def _counters_for(self, rule_id: str) -> _Counters:
        counters = self._counters.get(rule_id)
        if counters is None:
            counters = self._counters[rule_id] = _Counters(
                evaluated=metrics.RULE_EVALUATIONS.labels(rule=rule_id),
                matched=metrics.RULE_MATCHES.labels(rule=rule_id),
            )
        return counters

    def _record_failure(self, failure: RuleFailure, consecutive: int) -> None:
        """Count a failure; log the first one of a run of failures."""
        counters = self._counters_for(failure.rule_id)
        counters.failures += 1
        first = counters.last_error is None or consecutive == 1
        counters.last_error = failure
        metrics.RULE_ERRORS.labels(rule=failure.rule_id, kind=failure.kind).inc()
        if first:
            log.warning(
                "rule %s failed (%s) on event %s at line %s: %s",
                failure.rule_id,
                failure.kind,
                failure.event_id,
                failure.line,
                failure.message,
            )

    def _record_quarantined(self, ruleset: Ruleset, indices: list[int]) -> None:
        for rule_index in indices:
            rule = ruleset.rules[rule_index - 1]
            self._quarantined[rule.id] = rule.compile_key
            last = self._counters_for(rule.id).last_error
            log.error(
                "rule %s quarantined after %d consecutive failures; last: %s",
                rule.id,
                ruleset.quarantine_after,
                last.message if last else "?",
            )
        _set_gauges(ruleset.active_count, len(ruleset.quarantined))

    # ------------------------------------------------------------------ queries

    def statuses(self, ruleset: Ruleset | None) -> list[RuleStatus]:
        """Return every known rule with its status: active, quarantined, error or disabled."""
        result: list[RuleStatus] = []
        if ruleset is not None:
            for number, rule in enumerate(ruleset.rules, start=1):
                status: Status = "quarantined" if number in ruleset.quarantined else "active"
                consecutive = ruleset.consecutive_failures(number)
                result.append(self._status(rule.id, status, rule, consecutive))
        for rule_id, rule in self._disabled.items():
            result.append(self._status(rule_id, "disabled", rule, 0))
        for rule_id, error in self._load_errors.items():
            errored = self._status(rule_id, "error", None, 0)
            errored.last_error = error.to_dict()
            result.append(errored)
        return sorted(result, key=lambda status: status.id)

    def _status(
        self, rule_id: str, status: Status, rule: Rule | None, consecutive: int
    ) -> RuleStatus:
        counters = self._counters.get(rule_id) or _Counters(evaluated=None, matched=None)
        last = counters.last_error
        return RuleStatus(
            id=rule_id,
            status=status,
            rule=rule,
            evaluations=counters.evaluations,
            matches=counters.matches,
            failures=counters.failures,
            seconds=counters.seconds,
            consecutive_failures=consecutive,
            last_error=last.to_dict() if last else None,
        )


__all__ = ["RuleStats", "RuleStatus", "Status"]
