"""Event batches on SQLite: one thread, one connection, one hop per batch.

Through SQLAlchemy's async layer a batch took six round trips between the event loop and
aiosqlite's thread (checkout, BEGIN, two inserts, COMMIT, close), each waiting behind
whatever the loop was doing: a 500-row commit that costs ~3 ms in SQLite took 20-30 ms.
Here the whole transaction runs as one call on a dedicated thread. Rows are plain tuples in
the formats SQLAlchemy itself stores (JSON text; ``DateTime`` as UTC text with
microseconds), so everything else keeps reading them through SQLAlchemy.

Errors are sqlite3's own: ``sqlite3.OperationalError`` (locked, disk I/O) is an outage the
caller retries; any other ``sqlite3.Error`` means the data was refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flux import faults
from flux.events import Event
from flux.store.database import SQLITE_BUSY_TIMEOUT_MS, json_text, utc_datetime

INSERT_EVENTS = (
    "INSERT INTO events (id, device_id, topic, payload, received_at, source, hops) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
#: Several writers (``flux run --workers``) may commit a device's batches out of order:
#: first_seen only moves back, last_seen and last_payload only forward.
UPSERT_DEVICES = """
INSERT INTO devices (id, first_seen, last_seen, message_count, last_payload)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    first_seen = CASE WHEN excluded.first_seen < devices.first_seen
        THEN excluded.first_seen ELSE devices.first_seen END,
    last_seen = CASE WHEN excluded.last_seen >= devices.last_seen
        THEN excluded.last_seen ELSE devices.last_seen END,
    message_count = devices.message_count + excluded.message_count,
    last_payload = CASE WHEN excluded.last_seen >= devices.last_seen
        THEN excluded.last_payload ELSE devices.last_payload END
"""

#: One device's share of a batch: id, first and last arrival, messages, last payload.
DeviceSummary = tuple[str, float, float, int, dict[str, Any]]


class SqliteTime:
    """Format timestamps as SQLAlchemy stores ``DateTime`` on SQLite (UTC, microseconds),
    formatting the date and time part once per second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, timestamp: float) -> str:
        # Round exactly as datetime.fromtimestamp does: the fraction, half to even.
        fraction, whole = math.modf(timestamp)
        second, micro = int(whole), round(fraction * 1_000_000)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        elif micro < 0:
            second, micro = second - 1, micro + 1_000_000
        if second != self._second:
            self._second = second
            self._prefix = utc_datetime(second).strftime("%Y-%m-%d %H:%M:%S")
        return f"{self._prefix}.{micro:06d}"


def event_rows(batch: Sequence[Event]) -> list[tuple[Any, ...]]:
    """The events of ``batch`` as ``INSERT_EVENTS`` parameters (orjson may raise here)."""
    sqlite_time = SqliteTime()
    return [
        (
            event.id,
            event.device_id,
            event.topic,
            json_text(event.payload),
            sqlite_time(event.received_at),
            event.source,
            event.hops,
        )
        for event in batch
    ]


def device_rows(summaries: Sequence[DeviceSummary]) -> list[tuple[Any, ...]]:
    sqlite_time = SqliteTime()
    return [
        (device, sqlite_time(first), sqlite_time(last), count, json_text(payload))
        for device, first, last, count, payload in summaries
    ]


class SqliteBatchWriter:
    """Commit event batches through one sqlite3 connection owned by one thread."""

    def __init__(self, path: Path, *, synchronous: str) -> None:
        self._path = path
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def write(self, batch: Sequence[Event], devices: Sequence[DeviceSummary]) -> None:
        """Insert ``batch`` and upsert ``devices`` in one transaction; raise sqlite3 errors."""
        rows, summaries = event_rows(batch), device_rows(devices)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._commit, rows, summaries)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=True)

    # -- on the writer thread ----------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                self._path,
                timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,  # BEGIN and COMMIT are ours
                check_same_thread=False,  # opened, used and closed on the writer thread only
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            self._conn = conn
        return self._conn

    def _commit(self, rows: list[tuple[Any, ...]], devices: list[tuple[Any, ...]]) -> None:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT_EVENTS, rows)
            if devices:
                conn.executemany(UPSERT_DEVICES, devices)
            faults.hit("db_io_error")
            faults.hit("before_commit")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


__all__ = ["DeviceSummary", "SqliteBatchWriter", "SqliteTime", "event_rows"]
