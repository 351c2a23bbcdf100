"""Reading the metrics registry into snapshots, and rates and quantiles between two of them."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from flux.metrics import HotHistogram
from flux.snapshot import MetricsSnapshot, Window, histogram_quantile


def test_a_snapshot_reads_only_the_sampled_series_of_a_registry() -> None:
    registry = CollectorRegistry()
    hits = Counter("flux_plugin_pool_hits_total", "", ["plugin"], registry=registry)
    depth = Gauge("flux_eventbus_depth", "", ["subscriber"], registry=registry)
    Counter("flux_not_sampled_total", "", registry=registry).inc()
    hits.labels("a").inc(3)
    hits.labels("b").inc(4)
    depth.labels("store").set(7)

    snapshot = MetricsSnapshot.take(registry)

    assert snapshot.value("flux_plugin_pool_hits_total") == 7
    assert snapshot.value("flux_plugin_pool_hits_total", plugin="a") == 3
    assert snapshot.by("flux_plugin_pool_hits_total", "plugin") == {"a": 3, "b": 4}
    assert snapshot.value("flux_eventbus_depth", subscriber="store") == 7
    assert "flux_not_sampled_total" not in snapshot.samples
    assert "flux_plugin_pool_hits_created" not in snapshot.samples


def test_a_window_gives_increases_rates_means_and_quantiles() -> None:
    registry = CollectorRegistry()
    matches = Counter("flux_rule_matches_total", "", ["rule"], registry=registry)
    calls = Histogram(
        "flux_plugin_call_seconds", "", ["plugin"], buckets=(0.001, 0.01, 0.1), registry=registry
    )
    matches.labels("old").inc(5)
    calls.labels("p").observe(0.5)
    before = MetricsSnapshot.take(registry)
    matches.labels("old").inc(2)
    matches.labels("new").inc(4)  # a series the first snapshot did not have counts from 0
    for _ in range(90):
        calls.labels("p").observe(0.005)
    for _ in range(10):
        calls.labels("p").observe(0.05)
    after = MetricsSnapshot.take(registry)
    window = Window(
        MetricsSnapshot(at=100.0, samples=before.samples),
        MetricsSnapshot(at=102.0, samples=after.samples),
    )

    assert window.seconds == 2.0
    assert window.increase("flux_rule_matches_total") == 6
    assert window.increase_by("flux_rule_matches_total", "rule") == {"old": 2, "new": 4}
    assert window.rate_by("flux_rule_matches_total", "rule") == {"old": 1, "new": 2}
    assert window.mean("flux_plugin_call_seconds") == pytest.approx((90 * 0.005 + 10 * 0.05) / 100)
    assert window.mean_by("flux_plugin_call_seconds", "plugin") == {
        "p": pytest.approx(0.0095)
    }
    # 90 of 100 in (0.001, 0.01], 10 in (0.01, 0.1]: the median interpolates in the first.
    assert window.quantile(0.5, "flux_plugin_call_seconds") == pytest.approx(
        0.001 + 0.009 * 50 / 90
    )
    assert window.quantile(0.95, "flux_plugin_call_seconds") == pytest.approx(0.01 + 0.09 * 0.5)
    assert window.quantile(0.5, "flux_event_commit_latency_seconds") is None


def test_histogram_quantile_follows_prometheus() -> None:
    inf = math.inf
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {1.0: 0, inf: 0}) is None
    # Everything in the first bucket: interpolated from 0.
    assert histogram_quantile(0.5, {1.0: 10, 2.0: 10, inf: 10}) == pytest.approx(0.5)
    # In the +Inf bucket: the largest finite bound.
    assert histogram_quantile(0.99, {1.0: 1, 2.0: 1, inf: 10}) == 2.0
    # Empty buckets below still count as bounds.
    assert histogram_quantile(0.5, {1.0: 0, 2.0: 0, 4.0: 10, inf: 10}) == pytest.approx(3.0)


def test_the_hot_histogram_exports_what_a_histogram_would() -> None:
    registry = CollectorRegistry()
    plain = Histogram(
        "flux_db_batch_size", "", buckets=(0.001, 0.01, 1), registry=registry
    )
    values = [0.0005, 0.001, 0.002, 0.5, 3.0, 0.01]
    for value in values:
        plain.observe(value)
    hot = HotHistogram(
        "flux_db_batch_size", "", buckets=(1, 0.01, 0.001), registry=CollectorRegistry()
    )
    hot.observe_many(values[:3])
    hot.observe_many(values[3:])

    def samples(families: Iterable[Metric]) -> list[tuple[str, str | None, float]]:
        return sorted(
            (s.name, s.labels.get("le"), s.value)
            for family in families
            for s in family.samples
            if not s.name.endswith("_created")
        )

    assert samples(hot.collect()) == samples(registry.collect())
