"""shipped (S1) and storm (S2): a drifting sensor fleet through the shipped configuration."""

from __future__ import annotations

from functools import partial
from typing import Any

from scripts.bench.bench import Bench, Run
from scripts.bench.drain import drain_backlog
from scripts.bench.load import PublishCounter, publish_fleet

#: The ``storm`` scenario's rule: an alert and a QoS 1 publish for every telemetry message.
STORM_RULE = """
[[rules]]
id = "storm"
description = "benchmark: alert and publish for every telemetry message"
topic = "devices/+/telemetry"
when = "true"

[[rules.actions]]
type = "alert"
severity = "info"

[[rules.actions]]
type = "publish"
topic = "storm/{device_id}"
qos = 1
payload = { device = "{device_id}", seq = "{payload.seq}" }
"""


def _fleet_drain(bench: Bench, run: Run, extra_rules: str = "") -> dict[str, Any]:
    """Drain a fleet backlog through the shipped configuration (plus ``extra_rules``)."""
    args = bench.args
    assert bench.db is not None
    broker = bench.new_broker()
    bench.db.reset()
    config = bench.shipped_config(args.workers, extra_rules=extra_rules)
    per_device = max(1, args.messages // args.devices)
    total = per_device * args.devices
    preload = partial(publish_fleet, broker.port, args.devices, per_device, args.publishers)
    if not extra_rules:
        return drain_backlog(bench, run, config, total, preload)
    with PublishCounter(broker.port, "storm/#") as counter:
        return drain_backlog(bench, run, config, total, preload, counter)


def scenario_shipped(bench: Bench, run: Run) -> list[dict[str, Any]]:
    return [{"devices": bench.args.devices, **_fleet_drain(bench, run)}]


def scenario_storm(bench: Bench, run: Run) -> list[dict[str, Any]]:
    return [{"devices": bench.args.devices, **_fleet_drain(bench, run, STORM_RULE)}]
