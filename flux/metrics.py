"""Prometheus metrics of the pipeline stages (bus, MQTT, store, HTTP, health).

Names follow the seed documents; rules and plugins keep theirs beside their code
(``flux.rules.metrics``, ``flux.plugins.metrics``). All live in the default registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_PUBLISHED = Counter(
    "flux_events_published_total", "Events published on the event bus", ["source"]
)
EVENTBUS_DEPTH = Gauge(
    "flux_eventbus_depth", "Events waiting in a subscriber's queue", ["subscriber"]
)
EVENTBUS_DROPPED = Counter(
    "flux_eventbus_dropped_total",
    "Events a subscriber did not receive because its queue was full",
    ["subscriber", "reason"],
)
SUBSCRIBER_ERRORS = Counter(
    "flux_eventbus_subscriber_errors_total", "Batches a subscriber failed on", ["subscriber"]
)
MQTT_MESSAGES = Counter("flux_mqtt_messages_total", "MQTT messages received", ["qos"])
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
DB_WRITE_ERRORS = Counter(
    "flux_db_write_errors_total", "Batch writes that failed and will be retried"
)
DEAD_LETTERS = Counter("flux_dead_letters_total", "Messages stored as dead letters", ["reason"])
HTTP_REQUEST_DURATION = Histogram(
    "flux_http_request_duration_seconds",
    "HTTP request duration",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
DEGRADED = Gauge("flux_degraded", "1 while the gateway is degraded for this reason", ["reason"])

__all__ = [
    "DB_BATCH_SIZE",
    "DB_QUERY_DURATION",
    "DB_WRITE_ERRORS",
    "DEAD_LETTERS",
    "DEGRADED",
    "EVENTBUS_DEPTH",
    "EVENTBUS_DROPPED",
    "EVENTS_PUBLISHED",
    "HTTP_REQUEST_DURATION",
    "MQTT_CONNECTED",
    "MQTT_MESSAGES",
    "MQTT_RECONNECTS",
    "MQTT_STALE_ACKS",
    "SUBSCRIBER_ERRORS",
]
