"""PUBACK discipline against a scripted broker: exact packets, exact order."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from flux.metrics import DB_WRITE_ERRORS, MQTT_STALE_ACKS
from tests.harness import FakeBroker, Session, make_settings, sqlite_write_lock, unique, wait_until


def _stored(path: Path, seq: int) -> bool:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT payload FROM events").fetchall()
    return any(f'"seq":{seq}' in row[0] for row in rows)


async def _first_session(fake: FakeBroker, *, besides: Session | None = None) -> Session:
    return await fake.subscriber(besides=besides)


async def test_no_puback_before_the_batch_is_committed(tmp_path: Path, start_gateway: Any) -> None:
    dev = unique("dev")
    async with FakeBroker() as fake:
        settings = make_settings(tmp_path, ("127.0.0.1", fake.port), device_ids=[dev])
        async with start_gateway(settings) as gateway:
            session = await _first_session(fake)
            db = tmp_path / "flux.db"
            errors_before = DB_WRITE_ERRORS._value.get()
            async with sqlite_write_lock(db):
                session.publish(f"devices/{dev}/telemetry", b'{"seq": 1}', packet_id=1)
                # The writer has tried to commit and been refused at least once.
                await wait_until(
                    lambda: DB_WRITE_ERRORS._value.get() > errors_before,
                    timeout=30,
                    what="a refused commit",
                )
                assert session.pubacks == [], "PUBACK sent while the commit was impossible"
                assert not _stored(db, 1)
            await asyncio.wait_for(session.puback_event.wait(), 30)
            assert _stored(db, 1), "PUBACK arrived before the row was committed"
            assert session.pubacks == [1]
            assert gateway.writer is not None and gateway.writer.available


async def test_pubacks_follow_arrival_order(tmp_path: Path, start_gateway: Any) -> None:
    dev = unique("dev")
    async with FakeBroker() as fake:
        settings = make_settings(
            tmp_path, ("127.0.0.1", fake.port), device_ids=[dev], database={"batch_size": 7}
        )
        async with start_gateway(settings):
            session = await _first_session(fake)
            ids = list(range(1, 61))
            for packet_id in ids:
                session.publish(f"devices/{dev}/telemetry", b'{"seq": %d}' % packet_id, packet_id)
            await wait_until(lambda: len(session.pubacks) == len(ids), what="all PUBACKs")
            assert session.pubacks == ids


async def test_no_stale_puback_after_a_reconnect(tmp_path: Path, start_gateway: Any) -> None:
    dev = unique("dev")
    topic = f"devices/{dev}/telemetry"
    async with FakeBroker() as fake:
        settings = make_settings(tmp_path, ("127.0.0.1", fake.port), device_ids=[dev])
        async with start_gateway(settings) as gateway:
            first = await _first_session(fake)
            db = tmp_path / "flux.db"
            stale_before = MQTT_STALE_ACKS._value.get()
            async with sqlite_write_lock(db):
                first.publish(topic, b'{"seq": 7}', packet_id=7)
                assert gateway.mqtt is not None
                mqtt = gateway.mqtt
                await wait_until(lambda: mqtt.pending == 1, what="message in flight")
                first.drop()
                second = await _first_session(fake, besides=first)
            # The first message commits now, after its connection is gone.
            await wait_until(lambda: _stored(db, 7), timeout=30, what="row committed")
            await wait_until(
                lambda: MQTT_STALE_ACKS._value.get() > stale_before, what="stale ack withheld"
            )
            second.publish(topic, b'{"seq": 8}', packet_id=8)
            await asyncio.wait_for(second.puback_event.wait(), 30)
            assert second.pubacks == [8], "only the new connection's message is acknowledged"
            assert first.pubacks == []
