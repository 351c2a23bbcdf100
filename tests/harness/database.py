"""Reading what a gateway wrote: rows, sequence tallies, an external writer's lock."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

from flux.config import DatabaseConfig
from flux.store.database import create_engine
from flux.store.schema import dead_letters, devices, events


@dataclass(frozen=True)
class Tally:
    """What the database holds for one stream of sequence numbers."""

    sent: int
    stored_rows: int
    distinct: int
    missing: list[int]
    duplicates: int

    def describe(self) -> str:
        head = ", ".join(map(str, self.missing[:20]))
        more = " ..." if len(self.missing) > 20 else ""
        return (
            f"sent {self.sent}, stored rows {self.stored_rows} ({self.distinct} distinct), "
            f"missing {len(self.missing)} [{head}{more}], duplicates {self.duplicates}"
        )

class Db:
    """Read what a gateway wrote, through its own engine (SQLite file or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(DatabaseConfig(url=url))

    async def close(self) -> None:
        await self.engine.dispose()

    async def seqs(self, topic: str) -> list[int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(events.c.payload).where(events.c.topic == topic))
            return [row[0]["seq"] for row in rows]

    async def tally(self, topic: str, sent: int) -> Tally:
        seqs = await self.seqs(topic)
        counts = Counter(seqs)
        return Tally(
            sent=sent,
            stored_rows=len(seqs),
            distinct=len(counts),
            missing=[seq for seq in range(sent) if seq not in counts],
            duplicates=sum(n - 1 for n in counts.values()),
        )

    async def count(self, table: Any, *where: Any) -> int:
        async with self.engine.connect() as conn:
            statement = select(func.count()).select_from(table)
            for clause in where:
                statement = statement.where(clause)
            return int((await conn.execute(statement)).scalar_one())

    async def device_count(self, device_id: str) -> int:
        async with self.engine.connect() as conn:
            value = await conn.execute(
                select(devices.c.message_count).where(devices.c.id == device_id)
            )
            return int(value.scalar_one_or_none() or 0)

    async def dead_letters(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            return [dict(row) for row in (await conn.execute(select(dead_letters))).mappings()]

    async def has_all(self, topic: str, sent: int) -> bool:
        return len(set(await self.seqs(topic))) >= sent

    async def stored_at_least(self, topic: str, count: int) -> bool:
        """Whether ``count`` rows (duplicates included) are stored on ``topic``."""
        return len(await self.seqs(topic)) >= count

    async def integrity_ok(self) -> str:
        async with self.engine.connect() as conn:
            return str((await conn.execute(text("PRAGMA integrity_check"))).scalar_one())

@asynccontextmanager
async def sqlite_write_lock(path: Path) -> AsyncIterator[None]:
    """Hold the database's write lock from another connection, as an external writer would:
    taken on a thread, so the gateway's event loop goes on while it waits for the lock."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
    await asyncio.to_thread(conn.execute, "BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()
