"""Prometheus metrics of the pipeline stages (bus, MQTT, store, HTTP, health).

Names follow the seed documents; rules and plugins keep theirs beside their code
(``flux.rules.metrics``, ``flux.plugins.metrics``). All live in the default registry.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry


class HotCount:
    """One label value of a ``HotCounter``: a plain integer."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class HotCounter(Collector):
    """A labelled counter for per-message paths on the event loop thread.

    prometheus_client's ``Counter.inc`` takes a lock per call, a visible share of the CPU
    when done per message. Here an increment is a plain integer add; it is only safe from
    one thread (the event loop), which is where every caller runs.
    """

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self._name = name.removesuffix("_total")
        self._documentation = documentation
        self._label = label
        self._counts: dict[str, HotCount] = {}
        REGISTRY.register(self)

    def labels(self, **label: str) -> HotCount:
        """The count for one label value, as in ``Counter.labels(qos="1")``."""
        value = label[self._label]
        count = self._counts.get(value)
        if count is None:
            count = self._counts[value] = HotCount()
        return count

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, count in list(self._counts.items()):
            family.add_metric([value], count.value)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, labels=[self._label])


class HotHistogram(Collector):
    """A histogram fed a batch of values at a time on the event loop thread.

    ``Histogram.observe`` takes locks per value; here a batch costs one sort and one
    bisection per bucket. Only safe from one thread (the event loop).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self._bounds) + 1)  # per bucket, the last one +Inf
        self._sum = 0.0
        registry.register(self)

    def observe_many(self, values: Sequence[float]) -> None:
        """Count ``values`` (in any order)."""
        ordered = sorted(values)
        start = 0
        counts = self._counts
        for position, bound in enumerate(self._bounds):
            end = bisect_right(ordered, bound, start)
            counts[position] += end - start
            start = end
        counts[-1] += len(ordered) - start
        self._sum += sum(ordered)

    def collect(self) -> Iterator[Metric]:
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=buckets, sum_value=self._sum
        )

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation)


EVENTS_PUBLISHED = HotCounter(
    "flux_events_published_total", "Events published on the event bus", "source"
)
EVENTBUS_DEPTH = Gauge(
    "flux_eventbus_depth", "Events waiting in a subscriber's queue", ["subscriber"]
)
EVENTBUS_CAPACITY = Gauge(
    "flux_eventbus_capacity", "Events a subscriber's queue holds at most", ["subscriber"]
)
EVENTBUS_BLOCKED = Counter(
    "flux_eventbus_blocked_total",
    "Events whose sender had to wait because the subscriber's queue was full",
    ["subscriber"],
)
EVENTBUS_DROPPED = Counter(
    "flux_eventbus_dropped_total",
    "Events a subscriber did not receive because its queue was full",
    ["subscriber", "reason"],
)
SUBSCRIBER_ERRORS = Counter(
    "flux_eventbus_subscriber_errors_total", "Batches a subscriber failed on", ["subscriber"]
)
MQTT_MESSAGES = HotCounter("flux_mqtt_messages_total", "MQTT messages received", "qos")
MQTT_CONNECTED = Gauge("flux_mqtt_connected", "1 while the gateway is connected to the broker")
MQTT_RECONNECTS = Counter("flux_mqtt_reconnects_total", "Connection attempts after a loss")
MQTT_STALE_ACKS = Counter(
    "flux_mqtt_stale_acks_total",
    "Acknowledgements withheld because the connection they belonged to is gone",
)
DB_BATCH_SIZE = Histogram(
    "flux_db_batch_size",
    "Events per committed batch",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
DB_QUERY_DURATION = Histogram(
    "flux_db_query_duration_seconds",
    "Duration of database operations",
    ["operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DB_CONNECTIONS_ACTIVE = Gauge(
    "flux_db_connections_active", "Connections of the database pool checked out now"
)
DB_CONNECTIONS_IDLE = Gauge(
    "flux_db_connections_idle", "Connections of the database pool open and idle now"
)
EVENT_COMMIT_LATENCY = HotHistogram(
    "flux_event_commit_latency_seconds",
    "From receipt of an ingested event (MQTT or HTTP) to the commit of the batch holding it",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DB_WRITE_ERRORS = Counter(
    "flux_db_write_errors_total", "Batch writes that failed and will be retried"
)
DEAD_LETTERS = Counter("flux_dead_letters_total", "Messages stored as dead letters", ["reason"])
DEAD_LETTERS_REFUSED = Counter(
    "flux_dead_letters_refused_total",
    "Dead letters the database refused; their messages are left unacknowledged",
)
RETENTION_PURGED = Counter(
    "flux_retention_purged_total",
    "Rows deleted by retention: past their table's age limit (age) or over the size budget (size)",
    ["table", "reason"],
)
RETENTION_ERRORS = Counter(
    "flux_retention_errors_total", "Retention checks that failed (retried at the next interval)"
)
DB_SIZE = Gauge(
    "flux_db_size_bytes",
    "Size of the database (SQLite: its pages; PostgreSQL: flux's tables with their indexes)",
)
HTTP_REQUEST_DURATION = Histogram(
    "flux_http_request_duration_seconds",
    "HTTP request duration",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
DEGRADED = Gauge("flux_degraded", "1 while the gateway is degraded for this reason", ["reason"])

__all__ = [
    "DB_BATCH_SIZE",
    "DB_CONNECTIONS_ACTIVE",
    "DB_CONNECTIONS_IDLE",
    "DB_QUERY_DURATION",
    "DB_SIZE",
    "DB_WRITE_ERRORS",
    "DEAD_LETTERS",
    "DEAD_LETTERS_REFUSED",
    "DEGRADED",
    "EVENTBUS_BLOCKED",
    "EVENTBUS_CAPACITY",
    "EVENTBUS_DEPTH",
    "EVENTBUS_DROPPED",
    "EVENTS_PUBLISHED",
    "EVENT_COMMIT_LATENCY",
    "HTTP_REQUEST_DURATION",
    "MQTT_CONNECTED",
    "MQTT_MESSAGES",
    "MQTT_RECONNECTS",
    "MQTT_STALE_ACKS",
    "RETENTION_ERRORS",
    "RETENTION_PURGED",
    "SUBSCRIBER_ERRORS",
    "HotCount",
    "HotCounter",
    "HotHistogram",
]
