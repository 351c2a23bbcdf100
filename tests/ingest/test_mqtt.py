"""MQTT ingest: QoS 1 messages stored in SQLite and PostgreSQL, bad input dead-lettered and
acknowledged; no PUBACK before commit, PUBACKs in arrival order, none on a stale connection
(a scripted broker checks the exact packets)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from flux.app import Gateway
from flux.metrics import DB_WRITE_ERRORS, DEAD_LETTERS, MQTT_STALE_ACKS
from flux.store.schema import dead_letters, devices, events
from tests.harness import (
    FakeBroker,
    Session,
    device,
    make_settings,
    sqlite_write_lock,
    unique,
    wait_until,
)


async def _count(gateway: Gateway, table: Any) -> int:
    assert gateway.engine is not None
    async with gateway.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def _payloads(gateway: Gateway) -> list[dict[str, Any]]:
    assert gateway.engine is not None
    async with gateway.engine.connect() as conn:
        return [row[0] for row in await conn.execute(select(events.c.payload))]


async def _stream_and_check(gateway: Gateway, broker: tuple[str, int], dev: str, n: int) -> None:
    topic = f"devices/{dev}/telemetry"
    with device(*broker) as sim:
        sim.publish_all(
            [(topic, orjson.dumps({"seq": i, "temperature": 20 + i % 10})) for i in range(n)]
        )
    await wait_until(lambda: _count_is(gateway, n), timeout=60, what=f"{n} events stored")
    seqs = sorted(p["seq"] for p in await _payloads(gateway))
    assert seqs == list(range(n)), "every sequence number stored exactly once"
    assert gateway.engine is not None
    async with gateway.engine.connect() as conn:
        row = (await conn.execute(select(devices).where(devices.c.id == dev))).mappings().one()
    assert row["message_count"] == n


async def _count_is(gateway: Gateway, n: int) -> bool:
    return await _count(gateway, events) >= n


async def test_a_thousand_qos1_messages_are_all_stored_in_sqlite(
    tmp_path: Path, broker: tuple[str, int], start_gateway: Any
) -> None:
    dev = unique("dev")
    settings = make_settings(tmp_path, broker, device_ids=[dev], database={"batch_size": 100})
    async with start_gateway(settings) as gateway:
        await _stream_and_check(gateway, broker, dev, 1000)
    assert (tmp_path / "flux.db").exists()


@pytest.mark.postgres
async def test_qos1_messages_are_all_stored_in_postgresql(
    tmp_path: Path, broker: tuple[str, int], start_gateway: Any, pg_url: str
) -> None:
    dev = unique("dev")
    settings = make_settings(tmp_path, broker, device_ids=[dev], database_url=pg_url)
    async with start_gateway(settings) as gateway:
        await _stream_and_check(gateway, broker, dev, 500)


BAD_INPUTS = [
    (b"\xff\xfe\xfd", "invalid_utf8"),
    (b"{not json", "invalid_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'{"blob": "' + b"x" * 5000 + b'"}', "too_large"),
]


async def test_bad_input_is_dead_lettered_acknowledged_and_the_pipeline_goes_on(
    tmp_path: Path, broker: tuple[str, int], start_gateway: Any
) -> None:
    dev = unique("dev")
    settings = make_settings(tmp_path, broker, device_ids=[dev], mqtt={"max_payload_bytes": 4096})
    topic = f"devices/{dev}/telemetry"
    before = {reason: DEAD_LETTERS.labels(reason=reason)._value.get() for _, reason in BAD_INPUTS}
    async with start_gateway(settings) as gateway:
        with device(*broker) as sim:
            messages: list[tuple[str, bytes | str]] = [(topic, raw) for raw, _ in BAD_INPUTS]
            messages.append((topic, b'{"after": "bad input"}'))
            sim.publish_all(messages)
        await wait_until(lambda: _count_is(gateway, 1), what="good message stored")
        await wait_until(
            lambda: _dead_letter_count_is(gateway, len(BAD_INPUTS)), what="dead letters stored"
        )
        assert gateway.engine is not None
        async with gateway.engine.connect() as conn:
            rows = (await conn.execute(select(dead_letters))).mappings().all()
        assert sorted(row["reason"] for row in rows) == sorted(r for _, r in BAD_INPUTS)
        assert {bytes(row["payload"]) for row in rows} == {raw for raw, _ in BAD_INPUTS}
        assert all(row["topic"] == topic and row["detail"] for row in rows)
        assert gateway.readiness()["mqtt"]
    for _, reason in BAD_INPUTS:
        assert DEAD_LETTERS.labels(reason=reason)._value.get() - before[reason] == 1


async def _dead_letter_count_is(gateway: Gateway, n: int) -> bool:
    return await _count(gateway, dead_letters) >= n


async def test_dead_letters_and_events_are_acknowledged_so_nothing_is_redelivered(
    tmp_path: Path, broker: tuple[str, int], start_gateway: Any
) -> None:
    """A second gateway on the same persistent session receives nothing already stored."""
    dev = unique("dev")
    settings = make_settings(tmp_path, broker, device_ids=[dev])
    topic = f"devices/{dev}/telemetry"
    async with start_gateway(settings) as gateway:
        with device(*broker) as sim:
            sim.publish_all([(topic, b"garbage"), (topic, b'{"n": 1}')])
        await wait_until(lambda: _count_is(gateway, 1), what="event stored")
        await wait_until(lambda: _dead_letter_count_is(gateway, 1), what="dead letter stored")
    async with start_gateway(settings) as gateway:
        with device(*broker) as sim:
            sim.publish_all([(topic, b'{"n": 2}')])
        await wait_until(lambda: _count_is(gateway, 2), what="second event stored")
        assert await _count(gateway, events) == 2
        assert await _count(gateway, dead_letters) == 1


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
