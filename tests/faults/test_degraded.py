"""An honest ``/ready`` and ``flux_degraded{reason}``: each reason set, reported and cleared.

Reasons in ``flux.app.NOT_READY`` (``not_accepting``, ``database_unavailable``,
``mqtt_disconnected``) turn ``/ready`` into a 503; ``bus_backlog``, ``dropping`` and
``dead_letter_backlog`` are reported with a 200 and ``"degraded": [...]``. The database
reason is exercised by ``test_database_outage.py``; the others here.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from flux.app import NOT_READY, Gateway
from flux.config import DatabaseConfig
from flux.events import DeadLetter, Event
from flux.metrics import DEGRADED
from flux.store.database import create_engine, sqlite_path
from flux.store.migrate import upgrade_async
from flux.store.writer import StoreWriter
from tests.harness import (
    Db,
    PrivateMosquitto,
    SeqDevice,
    make_settings,
    metric_value,
    sqlite_write_lock,
    unique,
    wait_subscribed,
    wait_until,
)

CAPACITY = 32


def _gauge(reason: str) -> float:
    return DEGRADED.labels(reason=reason)._value.get()


async def _ready(http: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await http.get("/ready")
    return response.status_code, response.json()


def test_a_gateway_that_has_not_started_is_not_ready_and_says_why(tmp_path: Path) -> None:
    gateway = Gateway(settings=make_settings(tmp_path, ("127.0.0.1", 1)))
    reasons = gateway.degraded()
    assert set(reasons) == {"not_accepting", "database_unavailable", "mqtt_disconnected"}, reasons
    assert set(reasons) <= NOT_READY
    assert reasons["not_accepting"] == "starting"
    assert not any(gateway.readiness().values())


@pytest.mark.slow
async def test_backlog_and_drops_are_reported_but_the_gateway_stays_ready(
    tmp_path: Path, mosquitto: PrivateMosquitto, serve_gateway: Any
) -> None:
    dev = unique("dev")
    topic = f"devices/{dev}/telemetry"
    settings = make_settings(
        tmp_path, ("127.0.0.1", mosquitto.port), device_ids=[dev], eventbus={"capacity": CAPACITY}
    )
    db = Db(settings.database.url)
    sim = SeqDevice("127.0.0.1", mosquitto.port)
    release = asyncio.Event()
    seen: list[int] = []

    async def stuck(batch: list[Event]) -> None:
        await release.wait()
        seen.extend(event.payload["seq"] for event in batch)

    try:
        async with serve_gateway(settings) as (gateway, server):
            await wait_subscribed(sim, db, dev)
            bus = gateway.bus
            bus._health.window_s = 0.5  # the dropping window (30 s by default)
            # A subscriber of the operator's choosing that drops QoS 0 when it falls behind.
            unsubscribe = bus.subscribe("archive", stuck, overflow="drop_newest", max_batch=8)
            async with httpx.AsyncClient(
                base_url=server.url, timeout=10
            ) as http:
                sim.publish_seq(topic, range(200), qos=0)
                await wait_until(lambda: db.has_all(topic, 200), timeout=30, what="all stored")
                status, body = await _ready(http)
                assert status == 200, body
                assert body["ready"] is True
                assert body["degraded"] == ["bus_backlog", "dropping"], body
                assert (
                    body["reasons"]["bus_backlog"] == f"archive ({CAPACITY} of {CAPACITY} queued)"
                )
                assert body["reasons"]["dropping"].startswith("archive ("), body
                metrics = (await http.get("/metrics")).text
                assert metric_value(metrics, "flux_degraded", reason="bus_backlog") == 1.0
                assert metric_value(metrics, "flux_degraded", reason="dropping") == 1.0
                status_doc = (await http.get("/api/v1/status")).json()
                assert set(status_doc["degraded"]) == {"bus_backlog", "dropping"}

                release.set()  # it catches up; no drop for a window: both reasons clear
                await wait_until(
                    lambda: _ready_and_clean(http), timeout=10, what="/ready with nothing degraded"
                )
                metrics = (await http.get("/metrics")).text
                assert metric_value(metrics, "flux_degraded", reason="bus_backlog") == 0.0
                assert metric_value(metrics, "flux_degraded", reason="dropping") == 0.0
            unsubscribe()
        # The stored stream is complete whatever the slow subscriber dropped.
        tally = await db.tally(topic, 200)
        dropped = 200 - len(seen)
        print(f"\n[degraded: backlog and drops] {tally.describe()}; archive dropped {dropped}")
        assert not tally.missing and dropped > 0
    finally:
        sim.close()
        await db.close()


async def _ready_and_clean(http: httpx.AsyncClient) -> bool:
    status, body = await _ready(http)
    return status == 200 and body["degraded"] == []


@pytest.mark.slow
async def test_a_lost_broker_makes_the_gateway_not_ready_until_it_is_back(
    tmp_path: Path, mosquitto: PrivateMosquitto, serve_gateway: Any
) -> None:
    settings = make_settings(
        tmp_path, ("127.0.0.1", mosquitto.port), mqtt={"reconnect_max_delay_s": 1.0}
    )
    async with (
        serve_gateway(settings) as (gateway, server),
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
    ):
        assert await _ready_and_clean(http)
        mosquitto.stop()
        down_at = time.monotonic()
        await wait_until(
            lambda: not gateway.readiness()["mqtt"], timeout=20, what="disconnect seen"
        )
        status, body = await _ready(http)
        assert status == 503, body
        assert body["degraded"] == ["mqtt_disconnected"], body
        assert body["checks"]["mqtt"] is False
        assert _gauge("mqtt_disconnected") == 1
        mosquitto.start()
        up_at = time.monotonic()
        await wait_until(lambda: _ready_and_clean(http), timeout=30, what="ready again")
        print(
            f"\n[degraded: broker down {up_at - down_at:.1f}s] ready again "
            f"{time.monotonic() - up_at:.2f}s after the broker came back"
        )
        assert _gauge("mqtt_disconnected") == 0


@pytest.mark.slow
async def test_a_filling_dead_letter_queue_is_reported_and_clears(tmp_path: Path) -> None:
    config = DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/flux.db")
    await upgrade_async(config)
    path = sqlite_path(config.url)
    assert path is not None
    engine = create_engine(config)
    acked: list[int] = []
    try:
        async with StoreWriter(engine=engine, retry_max_delay_s=0.5) as writer:
            async with sqlite_write_lock(path):  # the dead letters cannot commit meanwhile
                for n in range(900):
                    letter = DeadLetter(
                        topic="devices/x/telemetry",
                        raw=b"\xff%d" % n,
                        reason="invalid_utf8",
                        detail="test",
                        received_at=time.time(),
                        source="mqtt",
                        ack=lambda n=n: acked.append(n),
                    )
                    await writer.add_dead_letter(letter)
                assert writer.dead_letter_backlog
                assert _gauge("dead_letter_backlog") == 1
                assert writer.dead_letters_queued > 800
            await wait_until(lambda: len(acked) == 900, timeout=30, what="dead letters stored")
            await wait_until(
                lambda: not writer.dead_letter_backlog, timeout=10, what="backlog cleared"
            )
            assert _gauge("dead_letter_backlog") == 0
    finally:
        await engine.dispose()
    assert acked == list(range(900))
