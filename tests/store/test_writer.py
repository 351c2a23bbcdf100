"""The batched writer stores what SQLAlchemy would, on SQLite (one-hop path) and PostgreSQL.

On SQLite events go to sqlite3 as tuples on the writer's own thread, bypassing SQLAlchemy;
reading them back through SQLAlchemy must give the same values the Core insert would have
stored.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from flux.config import DatabaseConfig
from flux.events import DeadLetter, Event, derive_event, make_event
from flux.metrics import DEAD_LETTERS_REFUSED
from flux.store.database import create_engine, utc_datetime
from flux.store.migrate import upgrade_async
from flux.store.schema import dead_letters, devices, events
from flux.store.sqlite_batch import SqliteTime
from flux.store.writer import REASON_STORE_REJECTED, StoreWriter
from tests.harness import wait_until


def _batch() -> list[Event]:
    batch: list[Event] = []
    payloads = [b'{"t": 21.5, "nested": {"a": [1, 2.5, null, "\xc3\xa9"]}}', b'{"seq": 2}']
    for index, raw in enumerate(payloads):
        event = make_event(f"devices/d{index}/telemetry", raw, max_bytes=4096, source="mqtt")
        assert isinstance(event, Event)
        batch.append(event)
    batch[0].received_at = 1_795_000_000.999_9996  # rounds up into the next second
    batch[1].received_at = 1_795_000_001.000_001
    batch.append(derive_event(batch[1], topic="devices/d1/enriched", payload={"f": 70.7}))
    return batch


async def _write(url: str, *batches: list[Event], query: Any) -> tuple[list[str], list[Any]]:
    """Migrate, commit ``batches`` through a StoreWriter, then run ``query``; return the
    acknowledged event ids in order and the query's rows."""
    config = DatabaseConfig(url=url)
    await upgrade_async(config)
    engine = create_engine(config)
    acked: list[str] = []
    for batch in batches:
        for event in batch:
            event.ack = lambda event=event: acked.append(event.id)  # type: ignore[misc]
    try:
        async with StoreWriter(engine=engine) as writer:
            for batch in batches:
                await writer.write_batch(batch)
        async with engine.connect() as conn:
            rows = list((await conn.execute(query)).mappings())
    finally:
        await engine.dispose()
    return acked, rows


async def _stored(url: str) -> tuple[list[Event], list[Any]]:
    batch = _batch()
    acked, rows = await _write(url, batch, query=select(events))
    assert acked == [event.id for event in batch], "acknowledged in order, after commit"
    return batch, rows


def _check(batch: list[Event], rows: list[dict[str, Any]]) -> None:
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(batch)
    for event in batch:
        row = by_id[event.id]
        assert row["payload"] == event.payload
        assert (row["topic"], row["device_id"]) == (event.topic, event.device_id)
        assert (row["source"], row["hops"]) == (event.source, event.hops)
        expected = utc_datetime(event.received_at)
        stored = row["received_at"]
        if stored.tzinfo is None:  # SQLite keeps no zone; the writer stores UTC
            expected = expected.replace(tzinfo=None)
        assert stored == expected


async def test_sqlite_fast_path_stores_what_sqlalchemy_reads_back(tmp_path: Path) -> None:
    _check(*await _stored(f"sqlite+aiosqlite:///{tmp_path}/flux.db"))


@pytest.mark.postgres
async def test_postgresql_stores_the_same_batch(pg_url: str) -> None:
    _check(*await _stored(pg_url))


async def _write_unserializable(url: str) -> None:
    """A payload nested deeper than orjson writes (none can reach the store through ingest
    or a plugin: this is the store's own guard) is isolated into a ``store_rejected`` dead
    letter; the rest of the batch is stored, all acknowledged."""
    batch = _batch()
    deep: dict[str, Any] = {}
    for _ in range(300):
        deep = {"a": deep}
    unwritable = make_event("devices/d0/deep", b'{"ok": 1}', max_bytes=4096, source="mqtt")
    assert isinstance(unwritable, Event)
    unwritable.payload = deep
    batch.insert(1, unwritable)
    acked, stored = await _write(url, batch, query=select(events.c.id))
    _, letters = await _write(url, query=select(dead_letters.c.reason))
    assert {row["id"] for row in stored} == {event.id for event in batch} - {batch[1].id}
    assert [row["reason"] for row in letters] == [REASON_STORE_REJECTED]
    assert acked == [event.id for event in batch]


async def test_a_payload_sqlite_cannot_serialize_becomes_a_dead_letter(tmp_path: Path) -> None:
    await _write_unserializable(f"sqlite+aiosqlite:///{tmp_path}/flux.db")


@pytest.mark.postgres
async def test_a_payload_postgresql_cannot_serialize_becomes_a_dead_letter(pg_url: str) -> None:
    await _write_unserializable(pg_url)


async def _out_of_order_device_batches(url: str) -> None:
    """Two writers may commit a device's batches out of order (``flux run --workers``):
    the device row keeps the latest last_seen and payload, and counts both."""
    later, earlier = (
        make_event("devices/d9/telemetry", raw, max_bytes=1024, source="mqtt")
        for raw in (b'{"n": "later"}', b'{"n": "earlier"}')
    )
    assert isinstance(later, Event) and isinstance(earlier, Event)
    later.received_at, earlier.received_at = 1_795_000_100.5, 1_795_000_000.25
    _, [row] = await _write(url, [later], [earlier], query=select(devices))
    assert row["message_count"] == 2
    assert row["last_payload"] == {"n": "later"}
    naive = [utc_datetime(e.received_at).replace(tzinfo=None) for e in (later, earlier)]
    assert row["last_seen"].replace(tzinfo=None) == naive[0]
    assert row["first_seen"].replace(tzinfo=None) == naive[1]


async def test_sqlite_device_rows_only_move_forward(tmp_path: Path) -> None:
    await _out_of_order_device_batches(f"sqlite+aiosqlite:///{tmp_path}/flux.db")


@pytest.mark.postgres
async def test_postgresql_device_rows_only_move_forward(pg_url: str) -> None:
    await _out_of_order_device_batches(pg_url)


@settings(max_examples=2000, derandomize=True, database=None)
@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_sqlite_time_rounds_like_datetime(timestamp: float) -> None:
    """The writer's own timestamp text equals SQLAlchemy's (via datetime) to the microsecond."""
    expected = utc_datetime(timestamp).strftime("%Y-%m-%d %H:%M:%S.%f")
    assert SqliteTime()(timestamp) == expected


async def test_a_dead_letter_the_database_refuses_is_never_acknowledged(tmp_path: Path) -> None:
    """A dead letter is acknowledged only once it is stored: one the database refuses (here
    a trigger, as a constraint would) is counted and left for redelivery; its batch's other
    letters are stored and acknowledged."""
    url = f"sqlite+aiosqlite:///{tmp_path}/flux.db"
    config = DatabaseConfig(url=url)
    await upgrade_async(config)
    with sqlite3.connect(tmp_path / "flux.db") as conn:
        conn.execute(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON dead_letters "
            "WHEN NEW.topic LIKE '%poison%' "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END"
        )
    engine = create_engine(config)
    acked: list[str] = []
    topics = ["devices/a/t", "devices/poison/t", "devices/b/t"]
    refused_before = DEAD_LETTERS_REFUSED._value.get()
    try:
        async with StoreWriter(engine=engine, retry_max_delay_s=0.1) as writer:
            for topic in topics:
                await writer.add_dead_letter(
                    DeadLetter(
                        topic=topic,
                        raw=b"{not json",
                        reason="invalid_json",
                        detail="test",
                        received_at=time.time(),
                        source="mqtt",
                        ack=lambda topic=topic: acked.append(topic),  # type: ignore[misc]
                    )
                )
            await wait_until(
                lambda: DEAD_LETTERS_REFUSED._value.get() == refused_before + 1,
                what="the refusal counted",
            )
        async with engine.connect() as conn:
            stored = [row[0] for row in await conn.execute(select(dead_letters.c.topic))]
    finally:
        await engine.dispose()
    assert acked == ["devices/a/t", "devices/b/t"]
    assert sorted(stored) == ["devices/a/t", "devices/b/t"]
