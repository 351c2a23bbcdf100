"""The batched writer stores what SQLAlchemy would, on SQLite (driver fast path) and PostgreSQL.

On SQLite events go to the driver as tuples, bypassing SQLAlchemy's row processing; reading
them back through SQLAlchemy must give the same values the Core insert would have stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from flux.config import DatabaseConfig
from flux.events import Event, derive_event, make_event
from flux.store.database import create_engine
from flux.store.migrate import upgrade_async
from flux.store.schema import events
from flux.store.writer import StoreWriter, _utc


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


async def _stored(url: str) -> tuple[list[Event], list[dict[str, Any]]]:
    config = DatabaseConfig(url=url)
    await upgrade_async(config)
    engine = create_engine(config)
    batch = _batch()
    acked: list[str] = []
    for event in batch:
        event.ack = lambda event=event: acked.append(event.id)  # type: ignore[misc]
    try:
        async with StoreWriter(engine=engine) as writer:
            await writer.write_batch(batch)
        async with engine.connect() as conn:
            rows = [dict(row) for row in (await conn.execute(select(events))).mappings()]
    finally:
        await engine.dispose()
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
        expected = _utc(event.received_at)
        stored = row["received_at"]
        if stored.tzinfo is None:  # SQLite keeps no zone; the writer stores UTC
            expected = expected.replace(tzinfo=None)
        assert stored == expected


async def test_sqlite_fast_path_stores_what_sqlalchemy_reads_back(tmp_path: Path) -> None:
    _check(*await _stored(f"sqlite+aiosqlite:///{tmp_path}/flux.db"))


@pytest.mark.postgres
async def test_postgresql_stores_the_same_batch(pg_url: str) -> None:
    _check(*await _stored(pg_url))
