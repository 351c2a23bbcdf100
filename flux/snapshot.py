"""The gateway's own Prometheus metrics read into plain numbers, and what changed between two
readings: what the dashboard's charts and the tuning report are computed from.

A ``MetricsSnapshot`` holds the samples of the metrics in ``SAMPLED`` at one moment; a
``Window`` between two of them gives increases, rates, means and histogram quantiles the
way PromQL's ``increase``, ``rate`` and ``histogram_quantile`` would over that range
(counters in one process never reset, and a series missing from the older snapshot
counts from 0).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import REGISTRY
from prometheus_client.registry import CollectorRegistry

#: One series' labels, sorted by name.
Labels = tuple[tuple[str, str], ...]

#: The metric families a snapshot reads (their samples: ``_total``, ``_sum``, ``_bucket``...).
SAMPLED_FAMILIES = {
    "counter": (
        "flux_events_published",
        "flux_eventbus_blocked",
        "flux_eventbus_dropped",
        "flux_dead_letters",
        "flux_mqtt_messages",
        "flux_rule_evaluations",
        "flux_rule_matches",
        "flux_rule_errors",
        "flux_plugin_pool_hits",
        "flux_plugin_pool_misses",
        "flux_plugin_pool_waits",
        "flux_plugin_pool_exhausted",
        "flux_plugin_executions",
        "flux_plugin_recycles",
        "flux_sink_sent",
        "flux_sink_failures",
        "flux_sink_dropped",
    ),
    "gauge": (
        "flux_eventbus_depth",
        "flux_eventbus_capacity",
        "flux_db_connections_active",
        "flux_db_connections_idle",
        "flux_mqtt_connected",
        "flux_plugin_pool_available",
        "flux_plugin_memory_bytes",
        "flux_degraded",
        "flux_sink_backlog",
        "flux_sink_backlog_bytes",
        "flux_sink_oldest_age_seconds",
        "flux_sink_connected",
    ),
    "histogram": (
        "flux_db_batch_size",
        "flux_db_query_duration_seconds",
        "flux_event_commit_latency_seconds",
        "flux_rule_eval_seconds",
        "flux_plugin_call_seconds",
    ),
    # A counter by meaning, exposed untyped beside the histogram of the same family name.
    "untyped": ("flux_rule_eval_seconds_total",),
}
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "untyped": ("",),
}
SAMPLED = frozenset(
    family + suffix
    for kind, families in SAMPLED_FAMILIES.items()
    for family in families
    for suffix in _SUFFIXES[kind]
)


def _labels(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _matches(series: Labels, wanted: Mapping[str, str]) -> bool:
    if not wanted:
        return True
    present = dict(series)
    return all(present.get(key) == value for key, value in wanted.items())


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """The samples of ``SAMPLED`` at ``at`` (UNIX time): sample name -> labels -> value."""

    at: float
    samples: Mapping[str, Mapping[Labels, float]]

    @classmethod
    def take(
        cls, registry: CollectorRegistry = REGISTRY, names: Iterable[str] = SAMPLED
    ) -> MetricsSnapshot:
        """Read the registry now (only the collectors behind ``names``)."""
        wanted = frozenset(names)
        samples: dict[str, dict[Labels, float]] = {}
        for family in registry.restricted_registry(wanted).collect():
            for sample in family.samples:
                if sample.name in wanted:
                    samples.setdefault(sample.name, {})[_labels(sample.labels)] = sample.value
        return cls(at=time.time(), samples=samples)

    def value(self, name: str, **labels: str) -> float:
        """The sum of the series of ``name`` that carry ``labels`` (0 when there is none)."""
        return sum(v for key, v in self.samples.get(name, {}).items() if _matches(key, labels))

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """The series of ``name`` carrying ``labels``, summed per value of ``label``."""
        totals: dict[str, float] = {}
        for key, value in self.samples.get(name, {}).items():
            if not _matches(key, labels):
                continue
            group = dict(key).get(label)
            if group is not None:
                totals[group] = totals.get(group, 0.0) + value
        return totals


class Window:
    """What happened between two snapshots of the same process."""

    def __init__(self, before: MetricsSnapshot, after: MetricsSnapshot) -> None:
        self.before = before
        self.after = after
        self.seconds = max(after.at - before.at, 1e-9)

    def increase(self, name: str, **labels: str) -> float:
        """How much the counter (or histogram ``_sum``/``_count``) ``name`` grew."""
        return max(0.0, self.after.value(name, **labels) - self.before.value(name, **labels))

    def increase_by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """``increase`` per value of ``label``; values that did not grow are left out."""
        grown = self._grown_by(name, label, labels)
        return {group: value for group, value in grown.items() if value > 0}

    def _grown_by(self, name: str, label: str, labels: Mapping[str, str]) -> dict[str, float]:
        before = self.before.by(name, label, **labels)
        return {
            group: max(0.0, value - before.get(group, 0.0))
            for group, value in self.after.by(name, label, **labels).items()
        }

    def rate(self, name: str, **labels: str) -> float:
        """``increase`` per second."""
        return self.increase(name, **labels) / self.seconds

    def rate_by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """``increase_by`` per second."""
        return {k: v / self.seconds for k, v in self.increase_by(name, label, **labels).items()}

    def mean(self, histogram: str, **labels: str) -> float | None:
        """The mean observation of ``histogram`` in the window (None without observations)."""
        count = self.increase(f"{histogram}_count", **labels)
        return self.increase(f"{histogram}_sum", **labels) / count if count else None

    def mean_by(self, histogram: str, label: str) -> dict[str, float]:
        """``mean`` per value of ``label`` (values without observations left out)."""
        sums = self.increase_by(f"{histogram}_sum", label)
        counts = self.increase_by(f"{histogram}_count", label)
        return {k: sums.get(k, 0.0) / n for k, n in counts.items()}

    def quantile(self, q: float, histogram: str, **labels: str) -> float | None:
        """The ``q`` quantile of ``histogram`` in the window, as ``histogram_quantile``."""
        buckets = self._grown_by(f"{histogram}_bucket", "le", labels)
        return histogram_quantile(q, {float(le): count for le, count in buckets.items()})


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' estimate of quantile ``q`` from cumulative bucket counts (``le`` ->
    count): linear within the bucket it falls in; the largest finite bound if it falls in
    the +Inf bucket; None without observations."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]) or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


__all__ = ["SAMPLED", "Labels", "MetricsSnapshot", "Window", "histogram_quantile"]
