"""The rules' metrics: a rule that is gone leaves no series behind."""

from __future__ import annotations

from prometheus_client import REGISTRY

from flux.rules import metrics


def series(rule_id: str) -> list[str]:
    return [
        f"{sample.name}{sorted(sample.labels.items())}"
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.labels.get("rule") == rule_id
    ]


def test_forget_rule_drops_every_series_of_the_rule() -> None:
    metrics.RULE_EVALUATIONS.labels(rule="metrics-gone").inc()
    metrics.RULE_MATCHES.labels(rule="metrics-gone").inc()
    for kind in metrics.RULE_ERROR_KINDS:
        metrics.RULE_ERRORS.labels(rule="metrics-gone", kind=kind).inc()
    metrics.RULE_EVALUATIONS.labels(rule="metrics-kept").inc()
    assert len(series("metrics-gone")) >= 2 + len(metrics.RULE_ERROR_KINDS)
    metrics.forget_rule("metrics-gone")
    assert series("metrics-gone") == []
    assert series("metrics-kept") != []
    metrics.forget_rule("never-seen")
