"""Retention: keep the database within its age limits and its size budget, unattended.

Every ``database.retention_interval_s`` one check runs: rows of ``events``, ``alerts`` and
``dead_letters`` older than their table's retention are deleted; then, while the database is
above ``database.max_size_mb``, the oldest events, and once none is left the oldest alerts
and dead letters. The outbox is left alone: it only holds what is still to be delivered to
a sink (a delivered row is deleted at once, a webhook given up on becomes a dead letter), so
neither age nor size ever removes a row from it; each sink bounds its own backlog
(``max_backlog_mb``).

Deletes take the ``BATCH_ROWS`` oldest rows by primary key (ids grow with time), each batch
its own short transaction, and after each batch the purge pauses as long as the batch took
(``MIN_PAUSE_S`` at least): a store commit waits for one batch at most, and the purge takes
at most half of the database's time. On SQLite the batches run on the store writer's own
thread and connection, between its commits (a commit waits for them in line, never in the
busy handler's sleeps), each followed by a passive WAL checkpoint, and free pages beyond a
tenth of the file go back to the file system: the schema has ``auto_vacuum = INCREMENTAL``
and each check runs ``PRAGMA incremental_vacuum`` in short steps. PostgreSQL deletes the
same way; its autovacuum makes the space reusable, so there the tables level off instead of
shrinking.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Protocol, Self, TypeVar

from sqlalchemy import Column, Table, delete, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from flux import faults
from flux.config import DatabaseConfig
from flux.metrics import DB_SIZE, RETENTION_ERRORS, RETENTION_PURGED
from flux.store.schema import alerts, dead_letters, events, metadata
from flux.store.sqlite_batch import SqliteTime
from flux.store.writer import StoreWriter
from flux.tasks import cancel_and_wait

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Rows per delete transaction.
BATCH_ROWS = 500
#: The shortest pause after a delete or vacuum step (longer when the step took longer).
MIN_PAUSE_S = 0.005
#: Pages one ``PRAGMA incremental_vacuum`` step gives back (4 KiB each).
VACUUM_PAGES = 256
#: Free pages up to this share of the file are kept for new rows rather than given back: at
#: steady state a check frees a sliver, which new rows reuse, and nothing is moved.
KEEP_FREE = 0.1
MIB = 1024 * 1024

AGE, SIZE = "age", "size"


@dataclass(frozen=True, slots=True)
class Retained:
    """A table retention purges: oldest first by ``key``, aged by ``time``."""

    table: Table
    key: Column[Any]
    time: Column[Any]

    @property
    def name(self) -> str:
        return self.table.name


RETAINED = {
    "events": Retained(events, events.c.id, events.c.received_at),
    "alerts": Retained(alerts, alerts.c.id, alerts.c.created_at),
    "dead_letters": Retained(dead_letters, dead_letters.c.id, dead_letters.c.received_at),
}
#: The order the size budget purges in: the oldest events, then the oldest alerts and dead
#: letters (whichever holds the older row).
SIZE_ORDER = (("events",), ("alerts", "dead_letters"))


class _Database(Protocol):
    async def delete_oldest(self, target: Retained, limit: int, before: datetime | None) -> int:
        """Delete up to ``limit`` of the oldest rows (only those before ``before``)."""
        ...

    async def oldest(self, target: Retained) -> Any:
        """The time of the oldest row (as the driver returns it), None when empty."""
        ...

    async def size(self) -> int:
        """The database's size in bytes (``flux_db_size_bytes``)."""
        ...

    async def excess_rows(self, budget: int) -> int:
        """How many of the oldest rows to delete now for the database to fit in ``budget``
        bytes; 0 when it fits (or, on PostgreSQL, until it grows again)."""
        ...

    async def reclaim_step(self) -> bool:
        """Give some free space back to the file system; False once none is left."""
        ...


class Retention:
    """Purge rows past their age and over the size budget every ``interval_s``; an async
    context manager running one task. A failed check is logged, counted and retried at the
    next interval; the gateway never stops for it."""

    def __init__(
        self,
        *,
        database: _Database,
        days: Mapping[str, int],
        max_size_bytes: int,
        interval_s: float,
    ) -> None:
        unknown = set(days) - set(RETAINED)
        if unknown:
            raise ValueError(f"no retention for tables {sorted(unknown)}")
        self._db = database
        self.days = dict(days)
        self.max_size_bytes = max_size_bytes
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        #: Checks completed since start (failed ones not counted).
        self.checks = 0
        self._over_budget_warned = False
        for name in RETAINED:
            for reason in (AGE, SIZE):
                RETENTION_PURGED.labels(table=name, reason=reason)

    @classmethod
    def from_config(
        cls, config: DatabaseConfig, *, engine: AsyncEngine, writer: StoreWriter
    ) -> Retention:
        """Retention of ``config``'s database: SQLite through the store writer's thread,
        PostgreSQL through ``engine``."""
        database: _Database = (
            PostgresRetention(engine)
            if engine.dialect.name == "postgresql"
            else SqliteRetention(writer)
        )
        return cls(
            database=database,
            days={name: config.retention_days_of(name) for name in RETAINED},
            max_size_bytes=int(config.max_size_mb * MIB),
            interval_s=config.retention_interval_s,
        )

    async def __aenter__(self) -> Self:
        if self._task is not None:
            raise RuntimeError("retention is already running")
        self._task = asyncio.create_task(self._run(), name="retention")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
                self.checks += 1
            except Exception as exc:
                RETENTION_ERRORS.inc()
                log.warning(
                    "retention check failed, retrying in %gs: %s: %s",
                    self.interval_s,
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
            await asyncio.sleep(self.interval_s)

    async def check(self) -> Counter[tuple[str, str]]:
        """Purge by age, then by size, give free space back; return rows purged per
        (table, reason)."""
        purged: Counter[tuple[str, str]] = Counter()
        now = datetime.now(UTC)
        for name, days in self.days.items():
            if days:
                await self._purge_age(RETAINED[name], now - timedelta(days=days), purged)
        if self.max_size_bytes:
            await self._purge_size(purged)
        while await self._paced(self._db.reclaim_step()):
            pass
        size = await self._db.size()
        DB_SIZE.set(size)
        if purged:
            done = ", ".join(f"{n} {table} ({why})" for (table, why), n in sorted(purged.items()))
            log.info("retention purged %s; the database is %.1f MiB", done, size / MIB)
        return purged

    async def _purge_age(
        self, target: Retained, before: datetime, purged: Counter[tuple[str, str]]
    ) -> None:
        while True:
            count = await self._paced(self._db.delete_oldest(target, BATCH_ROWS, before))
            self._count(target.name, AGE, count, purged)
            if count < BATCH_ROWS:
                return

    async def _purge_size(self, purged: Counter[tuple[str, str]]) -> None:
        while rows := await self._db.excess_rows(self.max_size_bytes):
            while rows > 0:
                count = await self._delete_for_size(min(BATCH_ROWS, rows), purged)
                if not count:
                    self._warn_nothing_left()
                    return
                rows -= count
        self._over_budget_warned = False

    async def _delete_for_size(self, limit: int, purged: Counter[tuple[str, str]]) -> int:
        """Delete one batch of the oldest rows in ``SIZE_ORDER``; 0 when all are empty."""
        for group in SIZE_ORDER:
            oldest = []
            for name in group:
                time = await self._db.oldest(RETAINED[name])
                if time is not None:
                    oldest.append((time, name))
            if oldest:
                _, name = min(oldest)
                count = await self._paced(self._db.delete_oldest(RETAINED[name], limit, None))
                self._count(name, SIZE, count, purged)
                return count
        return 0

    def _warn_nothing_left(self) -> None:
        if not self._over_budget_warned:
            self._over_budget_warned = True
            log.warning(
                "the database is above database.max_size_mb (%.1f MiB) with no event, alert "
                "or dead letter left to purge (rows waiting in the outbox for a sink, and "
                "device rows, are kept)",
                self.max_size_bytes / MIB,
            )

    @staticmethod
    def _count(table: str, reason: str, count: int, purged: Counter[tuple[str, str]]) -> None:
        if count:
            purged[(table, reason)] += count
            RETENTION_PURGED.labels(table=table, reason=reason).inc(count)

    @staticmethod
    async def _paced(step: Awaitable[T]) -> T:
        """Run one step, then pause as long as it took (``MIN_PAUSE_S`` at least)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await step
        await asyncio.sleep(max(MIN_PAUSE_S, loop.time() - started))
        return result


class SqliteRetention:
    """Retention's statements on SQLite, run on the store writer's thread and connection."""

    def __init__(self, writer: StoreWriter) -> None:
        self._run = writer.run_between_commits

    async def delete_oldest(self, target: Retained, limit: int, before: datetime | None) -> int:
        table, key = target.name, target.key.name
        oldest = f"SELECT {key} FROM {table} ORDER BY {key} LIMIT ?"
        sql = f"DELETE FROM {table} WHERE {key} IN ({oldest})"
        params: list[Any] = [limit]
        if before is not None:
            # Timestamps are stored as UTC text that sorts as time does (SqliteTime).
            sql += f" AND {target.time.name} < ?"
            params.append(SqliteTime()(before.timestamp()))
        return await self._run(partial(_write, sql, params))

    async def oldest(self, target: Retained) -> Any:
        table, key = target.name, target.key.name
        sql = f"SELECT {target.time.name} FROM {table} ORDER BY {key} LIMIT 1"
        row = await self._run(lambda conn: conn.execute(sql).fetchone())
        return None if row is None else row[0]

    async def size(self) -> int:
        return (await self._run(_sqlite_sizes))[0]

    async def excess_rows(self, budget: int) -> int:
        """A batch while the pages in use exceed ``budget``: a delete frees pages at once,
        so the size is measured again after each batch."""
        _, used = await self._run(_sqlite_sizes)
        return BATCH_ROWS if used > budget else 0

    async def reclaim_step(self) -> bool:
        return await self._run(_vacuum_step)


def _write(sql: str, params: list[Any], conn: sqlite3.Connection) -> int:
    """Run one statement in its own write transaction, then checkpoint; return the rows it
    changed."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        count = conn.execute(sql, params).rowcount
        faults.hit("disk_full")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    _checkpoint(conn)
    return count


def _checkpoint(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database file as far as no reader holds it back (passive:
    never waits); once all of it is copied, the file is cut to the database's pages.

    A purge writes many WAL pages; left to SQLite, the checkpoint it runs every 1000 pages
    falls on whichever commit crosses the mark, often an event batch, whose acknowledgement
    then waits for it. Checkpointing in the purge's own turn keeps that off the event batches.
    """
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _pragma(conn: sqlite3.Connection, name: str) -> int:
    return int(conn.execute(f"PRAGMA {name}").fetchone()[0])


def _sqlite_sizes(conn: sqlite3.Connection) -> tuple[int, int]:
    """The file's size as SQLite sees it (the WAL aside), and what its pages in use take."""
    page_size, pages = _pragma(conn, "page_size"), _pragma(conn, "page_count")
    return pages * page_size, (pages - _pragma(conn, "freelist_count")) * page_size


#: ``PRAGMA auto_vacuum`` of a database whose free pages ``incremental_vacuum`` gives back.
_INCREMENTAL = 2


def _excess_free_pages(conn: sqlite3.Connection) -> int:
    """Free pages beyond the ``KEEP_FREE`` share of the file."""
    return _pragma(conn, "freelist_count") - int(_pragma(conn, "page_count") * KEEP_FREE)


def _vacuum_step(conn: sqlite3.Connection) -> bool:
    """Give up to ``VACUUM_PAGES`` free pages beyond ``KEEP_FREE`` back in one write
    transaction, then checkpoint; return whether more are to be given back."""
    excess = _excess_free_pages(conn)
    if excess <= 0 or _pragma(conn, "auto_vacuum") != _INCREMENTAL:
        _checkpoint(conn)
        return False
    try:
        # executescript steps the pragma to its end; execute() would free one page.
        conn.executescript(
            f"BEGIN IMMEDIATE; PRAGMA incremental_vacuum({min(VACUUM_PAGES, excess)}); COMMIT;"
        )
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    _checkpoint(conn)
    # The file shrank, and with it the share kept free: measure again.
    left = _excess_free_pages(conn)
    return 0 < left < excess


class PostgresRetention:
    """Retention's statements on PostgreSQL, through the engine's pool."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        # The size at the last cut: deleted rows' space is reused, not given back, so the
        # size stays there until the tables outgrow it.
        self._cut_at = 0

    async def delete_oldest(self, target: Retained, limit: int, before: datetime | None) -> int:
        oldest = select(target.key).order_by(target.key).limit(limit)
        statement = delete(target.table).where(target.key.in_(oldest))
        if before is not None:
            statement = statement.where(target.time < before)
        async with self._engine.begin() as conn:
            count = int((await conn.execute(statement)).rowcount)
            faults.hit("disk_full")
        return count

    async def oldest(self, target: Retained) -> Any:
        async with self._engine.connect() as conn:
            query = select(target.time).order_by(target.key).limit(1)
            return (await conn.execute(query)).scalar_one_or_none()

    async def size(self) -> int:
        """flux's tables with their indexes and TOAST."""
        query = text(
            "SELECT coalesce(sum(pg_total_relation_size(to_regclass(name))), 0) "
            "FROM unnest(CAST(:names AS text[])) AS name"
        )
        async with self._engine.connect() as conn:
            return int((await conn.execute(query, {"names": list(metadata.tables)})).scalar_one())

    async def excess_rows(self, budget: int) -> int:
        """The excess in rows of the average size, once; then 0 until the tables outgrow
        their size at this cut (the space of the rows cut is reused meanwhile)."""
        size = await self.size()
        if size <= budget or size <= self._cut_at:
            return 0
        self._cut_at = size
        return math.ceil(await self._rows() * (size - budget) / size)

    async def _rows(self) -> int:
        """The planner's estimate of each table's rows, or a count where it has none yet."""
        total = 0
        async with self._engine.connect() as conn:
            for target in RETAINED.values():
                estimate = (
                    await conn.execute(
                        text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:name)"),
                        {"name": target.name},
                    )
                ).scalar_one_or_none()
                if estimate is None or estimate < 0:
                    count = select(func.count()).select_from(target.table)
                    estimate = (await conn.execute(count)).scalar_one()
                total += int(estimate)
        return total

    async def reclaim_step(self) -> bool:
        return False  # autovacuum makes the space reusable; the files keep their size


__all__ = [
    "BATCH_ROWS",
    "RETAINED",
    "PostgresRetention",
    "Retained",
    "Retention",
    "SqliteRetention",
]
