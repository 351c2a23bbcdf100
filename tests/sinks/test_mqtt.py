"""MQTT sinks end to end: a gateway forwarding device telemetry to a private upstream broker
(TLS and a password) through outages, restarts and a full backlog."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from tests.harness import (
    Db,
    SeqDevice,
    Upstream,
    UpstreamListener,
    first_arrivals_in_order,
    make_settings,
    unique,
    wait_until,
)

pytestmark = pytest.mark.slow


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _disconnects() -> float:
    return _metric("flux_sink_failures_total", sink="cloud", reason="disconnected")


def _settings(
    tmp_path: Path, broker: tuple[str, int], upstream: Upstream, devs: list[str], **sink: Any
) -> Any:
    cloud = upstream.sink(topic="site-7/{topic}", topics=["devices/+/telemetry"], **sink)
    # Small batches, so a full backlog takes effect within a few messages.
    database = {"batch_size": 10}
    return make_settings(
        tmp_path, broker, device_ids=devs, sinks={"cloud": cloud}, database=database
    )


def _publish(sim: SeqDevice, devs: list[str], seqs: range) -> None:
    for dev in devs:
        sim.publish_seq(f"devices/{dev}/telemetry", seqs)


async def _stored(db: Db, devs: list[str], count: int) -> bool:
    """Whether the gateway committed (and so acknowledged) ``count`` readings per device."""
    for dev in devs:
        if not await db.has_all(f"devices/{dev}/telemetry", count):
            return False
    return True


def _complete(listener: UpstreamListener, devs: list[str], count: int) -> bool:
    order = first_arrivals_in_order(listener.received())
    return all(len(order.get(dev, [])) >= count for dev in devs)


def _check_order(listener: UpstreamListener, devs: list[str], count: int) -> None:
    order = first_arrivals_in_order(listener.received())
    for dev in devs:
        assert order[dev] == list(range(count)), f"{dev}: {order[dev][:20]}..."


async def test_every_message_reaches_the_upstream_in_order_across_a_30s_outage(
    tmp_path: Path, broker: tuple[str, int], upstream: Upstream, serve_gateway: Any
) -> None:
    devs = [unique("dev") for _ in range(3)]
    settings = _settings(tmp_path, broker, upstream, devs)
    listener = UpstreamListener(upstream, "site-7/devices/#")
    sim = SeqDevice(*broker)
    db = Db(settings.database.url)
    try:
        async with serve_gateway(settings) as (gateway, server):
            _publish(sim, devs, range(0, 100))
            await wait_until(lambda: _complete(listener, devs, 100), timeout=60, what="first 100")
            lost_before = _disconnects()
            upstream.broker.stop()
            outage_started = time.monotonic()
            await wait_until(
                lambda: _disconnects() == lost_before + 1, what="the lost connection counted"
            )
            for start in range(100, 400, 20):  # the devices go on publishing
                _publish(sim, devs, range(start, start + 20))
                await wait_until(
                    lambda end=start + 20: _stored(db, devs, end),
                    timeout=30,
                    what="stored and acknowledged while the upstream is down",
                )
            async with httpx.AsyncClient(base_url=server.url) as http:
                sinks = {s["name"]: s for s in (await http.get("/api/v1/sinks")).json()}
            assert sinks["cloud"]["backlog_rows"] >= 3 * 300 - 100, sinks["cloud"]
            assert sinks["cloud"]["last_error"], "the outage should show as the sink's error"
            await wait_until(
                lambda: time.monotonic() - outage_started >= 30, timeout=40, what="30 s outage"
            )
            upstream.broker.start()
            _publish(sim, devs, range(400, 500))
            await wait_until(lambda: _complete(listener, devs, 500), timeout=90, what="all 500")
            await wait_until(
                lambda: gateway.sinks.describe_one("cloud")["backlog_rows"] == 0,
                timeout=30,
                what="the backlog drained",
            )
            lost_before = _disconnects()
        assert _disconnects() == lost_before, "closing the session at shutdown is no failure"
        _check_order(listener, devs, 500)
        event_ids = [event_id for _, _, event_id in listener.received()]
        assert all(event_ids), "every forwarded message carries its event id"
    finally:
        listener.close()
        sim.close()
        await db.close()


async def test_a_restart_while_the_upstream_is_down_keeps_the_backlog_in_order(
    tmp_path: Path, broker: tuple[str, int], upstream: Upstream, start_gateway: Any
) -> None:
    devs = [unique("dev") for _ in range(2)]
    settings = _settings(tmp_path, broker, upstream, devs)
    listener = UpstreamListener(upstream, "site-7/devices/#")
    upstream.broker.stop()
    sim = SeqDevice(*broker)
    db = Db(settings.database.url)
    try:
        async with start_gateway(settings):
            _publish(sim, devs, range(0, 150))
            await wait_until(lambda: _stored(db, devs, 150), timeout=60, what="first run stored")
        async with start_gateway(settings) as gateway:
            _publish(sim, devs, range(150, 300))
            await wait_until(lambda: _stored(db, devs, 300), timeout=60, what="second run stored")
            assert gateway.sinks.describe_one("cloud")["backlog_rows"] == 2 * 300
            upstream.broker.start()
            await wait_until(lambda: _complete(listener, devs, 300), timeout=90, what="all 300")
        _check_order(listener, devs, 300)
    finally:
        listener.close()
        sim.close()
        await db.close()


async def test_a_full_backlog_blocks_acknowledgements_and_loses_nothing(
    tmp_path: Path, broker: tuple[str, int], upstream: Upstream, start_gateway: Any
) -> None:
    dev = unique("dev")
    # About 20 rows of ~150 bytes fit in 3 KB.
    settings = _settings(tmp_path, broker, upstream, [dev], max_backlog_mb=0.003)
    listener = UpstreamListener(upstream, "site-7/devices/#")
    upstream.broker.stop()
    sim = SeqDevice(*broker)
    db = Db(settings.database.url)
    try:
        async with start_gateway(settings) as gateway:
            _publish(sim, [dev], range(200))
            await wait_until(
                lambda: gateway.sinks.describe_one("cloud")["full"], timeout=30, what="full"
            )
            # Messages past the limit wait, unacknowledged, in the local broker's session.
            await wait_until(lambda: gateway.mqtt.pending > 0, timeout=30, what="held back")
            stored = len(await db.seqs(f"devices/{dev}/telemetry"))
            assert stored < 200, "the store must stop while the backlog is full"
            upstream.broker.start()
            await wait_until(lambda: _complete(listener, [dev], 200), timeout=90, what="all 200")
            await wait_until(lambda: _stored(db, [dev], 200), timeout=30, what="all stored")
        _check_order(listener, [dev], 200)
    finally:
        listener.close()
        sim.close()
        await db.close()


async def test_drop_oldest_counts_exactly_what_it_dropped(
    tmp_path: Path, broker: tuple[str, int], upstream: Upstream, start_gateway: Any
) -> None:
    dev = unique("dev")
    settings = _settings(
        tmp_path, broker, upstream, [dev], max_backlog_mb=0.003, overflow="drop_oldest"
    )
    listener = UpstreamListener(upstream, "site-7/devices/#")
    upstream.broker.stop()
    sim = SeqDevice(*broker)
    dropped_before = _metric("flux_sink_dropped_total", sink="cloud", reason="drop_oldest")
    db = Db(settings.database.url)
    try:
        async with start_gateway(settings) as gateway:
            _publish(sim, [dev], range(200))
            await wait_until(lambda: _stored(db, [dev], 200), timeout=60, what="nothing blocks")
            await wait_until(
                lambda: not gateway.sinks.describe_one("cloud")["full"], timeout=30, what="trimmed"
            )
            upstream.broker.start()
            backlog = gateway.sinks.describe_one("cloud")["backlog_rows"]
            await wait_until(
                lambda: len(listener.received()) >= backlog, timeout=60, what="the kept rows"
            )
            await wait_until(
                lambda: gateway.sinks.describe_one("cloud")["backlog_rows"] == 0,
                timeout=30,
                what="drained",
            )
        dropped = _metric("flux_sink_dropped_total", sink="cloud", reason="drop_oldest")
        received = [payload["seq"] for _, payload, _ in listener.received()]
        assert dropped - dropped_before == 200 - len(set(received))
        assert received == list(range(200 - len(received), 200)), "the newest are kept, in order"
    finally:
        listener.close()
        sim.close()
        await db.close()
