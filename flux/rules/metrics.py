"""Prometheus metrics of the rules engine and rule actions (default registry)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Metric
from prometheus_client.registry import Collector

#: The ``kind`` labels of ``flux_rule_errors_total``.
RULE_ERROR_KINDS = ("runtime", "timeout", "memory", "undefined")

RULES_ACTIVE = Gauge("flux_rules_active", "Rules in the active ruleset that are evaluated")
RULES_QUARANTINED = Gauge(
    "flux_rules_quarantined", "Rules disabled after too many consecutive failures"
)
RULE_EVALUATIONS = Counter(
    "flux_rule_evaluations_total", "Rule evaluations (one rule against one event)", ["rule"]
)
RULE_MATCHES = Counter("flux_rule_matches_total", "Rule evaluations that matched", ["rule"])
RULE_ERRORS = Counter(
    "flux_rule_errors_total",
    f"Rule evaluations that failed, by kind ({', '.join(RULE_ERROR_KINDS)})",
    ["rule", "kind"],
)
RULE_EVAL_SECONDS = Histogram(
    "flux_rule_eval_seconds",
    "Wall time of one batched evaluation (all matching rules against one batch of events)",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)


class RuleSeconds(Collector):
    """``flux_rule_eval_seconds_total{rule}``: each rule's share of the evaluation time.

    A collector of its own because prometheus_client refuses a counter whose family name
    (``flux_rule_eval_seconds``) is the histogram's; it is exposed untyped, and only grows.
    """

    NAME = "flux_rule_eval_seconds_total"

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, rule_id: str, seconds: float) -> None:
        self.seconds[rule_id] = self.seconds.get(rule_id, 0.0) + seconds

    def forget(self, rule_id: str) -> None:
        self.seconds.pop(rule_id, None)

    def collect(self) -> Iterator[Metric]:
        metric = Metric(
            self.NAME,
            "Evaluation time attributed to each rule (its sampled share of each batch's time)",
            "unknown",
        )
        for rule_id, seconds in list(self.seconds.items()):
            metric.add_sample(self.NAME, {"rule": rule_id}, seconds)
        yield metric


RULE_SECONDS = RuleSeconds()
REGISTRY.register(RULE_SECONDS)
RULES_RELOAD = Counter(
    "flux_rules_reload_total", "Ruleset reloads by result (ok, partial, failed)", ["result"]
)
ACTION_EXECUTIONS = Counter(
    "flux_action_executions_total",
    "Rule actions run, by action type and result (ok, error, unhandled, loop_cut)",
    ["type", "result"],
)
RULE_STATE_WRITES = Counter(
    "flux_rule_state_writes_total",
    "Rule state rows handed to the store (script state per device, windows, quarantines)",
    ["kind"],
)
RULE_STATE_LOADED = Counter(
    "flux_rule_state_loaded_total",
    "Rule state rows read back: at start, or for a device first seen by this process",
    ["when"],
)
RULE_LOOPS_CUT = Counter(
    "flux_rule_loops_cut_total", "Derived events dropped because their hop count exceeded the max"
)

WINDOWS_OPEN = Gauge("flux_windows_open", "Open windows of a window rule", ["rule"])
WINDOWS_EMITTED = Counter(
    "flux_windows_emitted_total",
    "Windows a window rule closed (then evaluated by its when)",
    ["rule"],
)
WINDOW_EVENTS_DROPPED = Counter(
    "flux_window_events_dropped_total",
    "Events a window rule did not count, by reason (late: beyond allowed_lateness_s; "
    "no_time: time_field missing or not a number; no_group: group_by field missing)",
    ["rule", "reason"],
)
WINDOW_GROUPS_EVICTED = Counter(
    "flux_window_groups_evicted_total",
    "Groups (with their open windows) dropped because a window rule reached max_groups",
    ["rule"],
)


def forget_window_rule(rule_id: str) -> None:
    """Drop the window series of a rule that is gone."""
    for metric in (WINDOWS_OPEN, WINDOWS_EMITTED, WINDOW_GROUPS_EVICTED):
        with contextlib.suppress(KeyError):
            metric.remove(rule_id)
    for reason in ("late", "no_time", "no_group"):
        with contextlib.suppress(KeyError):
            WINDOW_EVENTS_DROPPED.remove(rule_id, reason)


def forget_rule(rule_id: str) -> None:
    """Drop the series of a rule that is gone, so dashboards stop showing it."""
    RULE_SECONDS.forget(rule_id)
    for metric in (RULE_EVALUATIONS, RULE_MATCHES):
        with contextlib.suppress(KeyError):
            metric.remove(rule_id)
    for kind in RULE_ERROR_KINDS:
        with contextlib.suppress(KeyError):
            RULE_ERRORS.remove(rule_id, kind)


__all__ = [
    "ACTION_EXECUTIONS",
    "RULES_ACTIVE",
    "RULES_QUARANTINED",
    "RULES_RELOAD",
    "RULE_ERRORS",
    "RULE_ERROR_KINDS",
    "RULE_EVALUATIONS",
    "RULE_EVAL_SECONDS",
    "RULE_LOOPS_CUT",
    "RULE_MATCHES",
    "RULE_SECONDS",
    "RULE_STATE_LOADED",
    "RULE_STATE_WRITES",
    "WINDOWS_EMITTED",
    "WINDOWS_OPEN",
    "WINDOW_EVENTS_DROPPED",
    "WINDOW_GROUPS_EVICTED",
    "RuleSeconds",
    "forget_rule",
    "forget_window_rule",
]
