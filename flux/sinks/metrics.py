"""The sinks' Prometheus metrics: one set for every sink, labelled by its name."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SINK_BACKLOG = Gauge("flux_sink_backlog", "Rows waiting in the outbox for the sink", ["sink"])
SINK_BACKLOG_BYTES = Gauge(
    "flux_sink_backlog_bytes", "Bytes waiting in the outbox for the sink", ["sink"]
)
SINK_OLDEST_AGE = Gauge(
    "flux_sink_oldest_age_seconds", "Age of the sink's oldest undelivered row", ["sink"]
)
SINK_ALERT_AFTER = Gauge(
    "flux_sink_alert_after_seconds",
    "The sink's alert_after_s: its oldest row may wait this long before it counts as behind",
    ["sink"],
)
SINK_SENT = Counter("flux_sink_sent_total", "Rows the sink's receiver confirmed", ["sink"])
SINK_FAILURES = Counter(
    "flux_sink_failures_total",
    "Failed sends (connect, refused, timeout, http_5xx, ...); each is retried",
    ["sink", "reason"],
)
SINK_DROPPED = Counter(
    "flux_sink_dropped_total",
    "Rows deleted unsent: drop_oldest over max_backlog_mb, or a webhook given up",
    ["sink", "reason"],
)
SINK_CONNECTED = Gauge(
    "flux_sink_connected", "1 while the sink reaches its receiver (last send worked)", ["sink"]
)

__all__ = [
    "SINK_ALERT_AFTER",
    "SINK_BACKLOG",
    "SINK_BACKLOG_BYTES",
    "SINK_CONNECTED",
    "SINK_DROPPED",
    "SINK_FAILURES",
    "SINK_OLDEST_AGE",
    "SINK_SENT",
]
