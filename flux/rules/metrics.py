"""Prometheus metrics of the rules engine and rule actions (default registry)."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

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
RULES_RELOAD = Counter(
    "flux_rules_reload_total", "Ruleset reloads by result (ok, partial, failed)", ["result"]
)
ACTION_EXECUTIONS = Counter(
    "flux_action_executions_total",
    "Rule actions run, by action type and result (ok, error, unhandled, loop_cut)",
    ["type", "result"],
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
    "WINDOWS_EMITTED",
    "WINDOWS_OPEN",
    "WINDOW_EVENTS_DROPPED",
    "WINDOW_GROUPS_EVICTED",
    "forget_rule",
    "forget_window_rule",
]
