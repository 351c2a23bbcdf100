"""An event the database refuses is never acknowledged without a row somewhere.

The writer turns a refused event into a ``store_rejected`` dead letter. PostgreSQL refuses
NUL in text columns and ``\\u0000`` in JSONB: an event carrying both must still end up as a
dead letter (raw bytes kept, texts escaped) before it is acknowledged.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from flux.config import DatabaseConfig
from flux.events import Event, make_event
from flux.store.database import create_engine
from flux.store.migrate import upgrade_async
from flux.store.schema import dead_letters, events
from flux.store.writer import StoreWriter


@pytest.mark.postgres
async def test_an_event_the_database_refuses_becomes_a_dead_letter_before_its_ack(
    pg_url: str,
) -> None:
    config = DatabaseConfig(url=pg_url)
    await upgrade_async(config)
    engine = create_engine(config)
    acked: list[str] = []
    try:
        async with StoreWriter(engine=engine, retry_max_delay_s=0.1) as writer:
            event = make_event(
                "devices/a\x00b/t", b'{"x": "nul \\u0000 inside"}', max_bytes=1024, source="http"
            )
            assert isinstance(event, Event)
            event.ack = lambda: acked.append(event.id)
            await writer.write_batch([event])
        async with engine.connect() as conn:
            rows = (await conn.execute(select(func.count()).select_from(events))).scalar_one()
            letters = (
                await conn.execute(select(func.count()).select_from(dead_letters))
            ).scalar_one()
        assert (rows, letters) == (0, 1), f"{rows} event rows and {letters} dead letters"
        assert acked == [event.id], "acknowledged once, after the dead letter committed"
    finally:
        await engine.dispose()
