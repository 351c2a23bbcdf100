"""The outbox table as the sinks read it: rows in order, backlog figures, the lease per sink.

Rows are inserted and deleted by the store, in the transactions of its event batches
(``flux.store.writer``): a row is committed with what caused it, and its deletion rides on a
later batch once the receiver confirmed it. Only reads and the leases are here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from flux.sinks.rows import OutboxRow
from flux.store.database import writer_connection
from flux.store.schema import outbox, sink_leases

#: What a row weighs in the backlog budget (``OutboxRow.size``).
_ROW_SIZE = func.length(outbox.c.payload) + func.length(outbox.c.topic)
_ROW_COLUMNS = (
    outbox.c.id,
    outbox.c.sink,
    outbox.c.topic,
    outbox.c.payload,
    outbox.c.created_at,
    outbox.c.device_id,
    outbox.c.event_id,
    outbox.c.rule_id,
    outbox.c.qos,
    outbox.c.retain,
    outbox.c.hops,
    outbox.c.headers,
    outbox.c.timeout_s,
)


def row_created_at(row_id: str) -> float:
    """When a row was created, from its id (milliseconds since the epoch come first)."""
    return int(row_id[:12], 16) / 1000


def _aware(value: datetime) -> datetime:
    """SQLite hands timestamps back naive; every timestamp flux writes is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Backlog:
    """What waits for one sink: rows, bytes, and the id of the oldest row (None: nothing)."""

    rows: int
    bytes: int
    oldest_id: str | None


class OutboxReader:
    """Read a sink's rows in order and hold the lease that makes one process its sender."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def read(self, sink: str, *, after: str, limit: int) -> list[OutboxRow]:
        """The sink's next ``limit`` rows with ids above ``after``, oldest first."""
        query = (
            select(*_ROW_COLUMNS)
            .where(outbox.c.sink == sink, outbox.c.id > after)
            .order_by(outbox.c.id)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            OutboxRow(
                id=row.id,
                sink=row.sink,
                topic=row.topic,
                payload=bytes(row.payload),
                created_at=_aware(row.created_at).timestamp(),
                device_id=row.device_id,
                event_id=row.event_id,
                rule_id=row.rule_id,
                qos=row.qos,
                retain=bool(row.retain),
                hops=row.hops,
                headers=dict(row.headers) if row.headers else None,
                timeout_s=row.timeout_s,
            )
            for row in rows
        ]

    async def backlog(self, sink: str) -> Backlog:
        """Count the sink's rows and their bytes (a scan of its rows: call it rarely)."""
        size = func.coalesce(func.sum(_ROW_SIZE), 0)
        query = select(func.count(), size, func.min(outbox.c.id)).where(outbox.c.sink == sink)
        async with self._engine.connect() as conn:
            count, total, oldest = (await conn.execute(query)).one()
        return Backlog(rows=int(count), bytes=int(total), oldest_id=oldest)

    async def oldest_id(self, sink: str) -> str | None:
        """The id of the sink's oldest row (an index lookup)."""
        query = select(func.min(outbox.c.id)).where(outbox.c.sink == sink)
        async with self._engine.connect() as conn:
            value = (await conn.execute(query)).scalar_one_or_none()
        return str(value) if value is not None else None

    async def oldest(self, sink: str, *, limit: int) -> list[tuple[str, int]]:
        """The ids and sizes of the sink's ``limit`` oldest rows."""
        query = (
            select(outbox.c.id, _ROW_SIZE)
            .where(outbox.c.sink == sink)
            .order_by(outbox.c.id)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return [(row[0], int(row[1])) for row in (await conn.execute(query)).all()]

    async def take_lease(self, sink: str, *, owner: str, ttl_s: float) -> bool:
        """Take or renew the sink's lease for ``ttl_s``; False while another owner holds it."""
        now = datetime.now(UTC)
        until = now + timedelta(seconds=ttl_s)
        conn = await writer_connection(self._engine)
        try:
            async with conn.begin():
                taken = await conn.execute(
                    update(sink_leases)
                    .where(
                        sink_leases.c.sink == sink,
                        or_(sink_leases.c.owner == owner, sink_leases.c.expires_at < now),
                    )
                    .values(owner=owner, expires_at=until)
                )
                if taken.rowcount:
                    return True
                lease = sink_leases.c
                held = await conn.execute(select(lease.owner).where(lease.sink == sink))
                if held.first() is not None:
                    return False
                await conn.execute(
                    insert(sink_leases).values(sink=sink, owner=owner, expires_at=until)
                )
                return True
        finally:
            await conn.close()

    async def release_lease(self, sink: str, *, owner: str) -> None:
        """Give the lease up (at shutdown), so another process may send at once."""
        conn = await writer_connection(self._engine)
        try:
            async with conn.begin():
                await conn.execute(
                    delete(sink_leases).where(
                        and_(sink_leases.c.sink == sink, sink_leases.c.owner == owner)
                    )
                )
        finally:
            await conn.close()


def row_ids(rows: Sequence[OutboxRow]) -> list[str]:
    return [row.id for row in rows]


__all__ = ["Backlog", "OutboxReader", "row_created_at", "row_ids"]
