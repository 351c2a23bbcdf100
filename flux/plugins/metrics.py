"""Prometheus metrics of the plugin pools (names from seed 004, kept), in the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

POOL_HITS = Counter(
    "flux_plugin_pool_hits_total", "Calls served by a warm pooled instance", ["plugin"]
)
POOL_MISSES = Counter(
    "flux_plugin_pool_misses_total", "Calls that had to create an instance", ["plugin"]
)
POOL_AVAILABLE = Gauge("flux_plugin_pool_available", "Warm instances idle in the pool", ["plugin"])
POOL_WAITS = Counter(
    "flux_plugin_pool_waits_total", "Calls that waited because every instance was busy", ["plugin"]
)
POOL_EXHAUSTED = Counter(
    "flux_plugin_pool_exhausted_total",
    "Calls that gave up waiting for an instance (the event is retried or dead-lettered)",
    ["plugin"],
)
EXECUTIONS = Counter(
    "flux_plugin_executions_total",
    "Plugin calls by result (ok, rejected, trap, timeout, limit, output_error)",
    ["plugin", "result"],
)
RECYCLES = Counter(
    "flux_plugin_recycles_total",
    "Instances replaced, by reason (executions, memory, trap, timeout, limit, error, restart)",
    ["plugin", "reason"],
)
MEMORY = Gauge(
    "flux_plugin_memory_bytes",
    "Largest linear memory among a plugin's idle instances, sampled every "
    "metrics.sample_interval_s",
    ["plugin"],
)
CALL_SECONDS = Histogram(
    "flux_plugin_call_seconds",
    "Time inside one plugin call (one message or one batch), excluding pool waits",
    ["plugin"],
    buckets=(
        0.00001,
        0.000025,
        0.00005,
        0.0001,
        0.00025,
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        1.0,
    ),
)

__all__ = [
    "CALL_SECONDS",
    "EXECUTIONS",
    "MEMORY",
    "POOL_AVAILABLE",
    "POOL_EXHAUSTED",
    "POOL_HITS",
    "POOL_MISSES",
    "POOL_WAITS",
    "RECYCLES",
]
