"""Event batches on SQLite: one thread, one connection, one hop per batch.

Through SQLAlchemy's async layer a batch takes six round trips between the event loop and
aiosqlite's thread (checkout, BEGIN, two inserts, COMMIT, close), each waiting behind
whatever the loop is doing, so a busy loop made a short commit long. Here the whole
transaction runs as one call on a dedicated thread. Rows are plain tuples in
the formats SQLAlchemy itself stores (JSON text; ``DateTime`` as UTC text with
microseconds), so everything else keeps reading them through SQLAlchemy.

Rows go in as multi-row ``INSERT ... VALUES (...), (...)`` statements, not
``executemany``: sqlite3 releases the GIL around every step, i.e. every row of an
``executemany``, and each time must win it back from the busy event loop (up to a switch
interval each): 500 rows took seconds with the loop busy. One statement per chunk of rows
releases it once.

Errors are sqlite3's own: ``sqlite3.OperationalError`` (locked, disk I/O) is an outage the
caller retries; any other ``sqlite3.Error`` means the data was refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import math
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from flux import faults
from flux.events import Event
from flux.rules.state import StateRow, state_params
from flux.sinks.rows import OutboxRow
from flux.store.database import (
    SQLITE_BUSY_TIMEOUT_MS,
    SQLITE_WAL_LIMIT_BYTES,
    json_text,
    payload_text,
    utc_datetime,
)
from flux.store.outbox import outbox_params

T = TypeVar("T")

UPSERT_RULE_STATE = (
    "INSERT INTO rule_state (rule_id, kind, key, fingerprint, value, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (rule_id, kind, key) DO UPDATE SET "
    "fingerprint = excluded.fingerprint, value = excluded.value, updated_at = excluded.updated_at"
)
DELETE_RULE_STATE = "DELETE FROM rule_state WHERE rule_id = ? AND kind = ? AND key = ?"

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

INSERT_ALERTS = (
    "INSERT INTO alerts (rule_id, device_id, event_id, severity, output, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)

INSERT_OUTBOX = (
    "INSERT INTO outbox (id, sink, device_id, event_id, rule_id, topic, payload, headers, "
    "timeout_s, qos, retain, hops, next_attempt_at, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
DELETE_OUTBOX = "DELETE FROM outbox WHERE id IN ({})"

#: The most rows in one multi-row statement (SQLite takes up to 32,766 parameters in one);
#: statements hold a power of two of rows, so a few cached texts serve every batch size.
ROWS_PER_STATEMENT = 256

#: One device's share of a batch: id, first and last arrival, messages, last payload.
DeviceSummary = tuple[str, float, float, int, dict[str, Any]]
#: A batch's statement parameters: event rows, device rows, alert rows, outbox rows, the
#: ids of outbox rows to delete, and rule state to upsert and to delete.
PreparedBatch = tuple[
    list[tuple[Any, ...]],
    list[tuple[Any, ...]],
    list[tuple[Any, ...]],
    list[tuple[Any, ...]],
    list[str],
    list[tuple[Any, ...]],
    list[tuple[Any, ...]],
]


@functools.cache
def _multi_row(statement: str, rows: int) -> str:
    """``statement`` (one ``VALUES (?, ...)`` row) rewritten to insert ``rows`` rows."""
    head, _, tail = statement.partition("VALUES (")
    placeholders, _, rest = tail.partition(")")
    return f"{head}VALUES " + ", ".join([f"({placeholders})"] * rows) + rest


def insert_rows(conn: sqlite3.Connection, statement: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Run ``statement`` for every row: chunks of ``ROWS_PER_STATEMENT`` rows, then the rest
    in power-of-two chunks, one step each."""
    start = 0
    while start < len(rows):
        count = min(ROWS_PER_STATEMENT, 1 << ((len(rows) - start).bit_length() - 1))
        chunk = rows[start : start + count]
        conn.execute(_multi_row(statement, count), list(itertools.chain.from_iterable(chunk)))
        start += count


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
            payload_text(event),
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


def outbox_rows(rows: Sequence[OutboxRow]) -> list[tuple[Any, ...]]:
    """``rows`` as ``INSERT_OUTBOX`` parameters."""
    return outbox_params(rows, SqliteTime())


def delete_rows(conn: sqlite3.Connection, ids: Sequence[str]) -> None:
    """Delete the outbox rows ``ids``, a few hundred per statement."""
    for start in range(0, len(ids), ROWS_PER_STATEMENT):
        chunk = ids[start : start + ROWS_PER_STATEMENT]
        conn.execute(DELETE_OUTBOX.format(", ".join("?" * len(chunk))), chunk)


def alert_rows(alerts: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """``alerts`` rows (``flux.rules.alert_row``) as ``INSERT_ALERTS`` parameters."""
    sqlite_time = SqliteTime()
    return [
        (
            alert["rule_id"],
            alert["device_id"],
            alert["event_id"],
            alert["severity"],
            json_text(alert["output"]),
            sqlite_time(alert["created_at"].timestamp()),
        )
        for alert in alerts
    ]


class SqliteBatchWriter:
    """Commit event batches through one sqlite3 connection owned by one thread."""

    def __init__(self, path: Path, *, synchronous: str) -> None:
        self._path = path
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux-sqlite")
        self._conn: sqlite3.Connection | None = None

    def prepare(
        self,
        batch: Sequence[Event],
        devices: Sequence[DeviceSummary],
        alerts: Sequence[dict[str, Any]] = (),
        outbox: Sequence[OutboxRow] = (),
        deletes: Sequence[str] = (),
        state: Sequence[StateRow] = (),
    ) -> PreparedBatch:
        """The statement parameters of one batch (orjson may raise here)."""
        upserts, removed = state_params(state, SqliteTime()) if state else ([], [])
        return (
            event_rows(batch),
            device_rows(devices),
            alert_rows(alerts),
            outbox_rows(outbox),
            list(deletes),
            upserts,
            removed,
        )

    async def commit(self, prepared: PreparedBatch) -> None:
        """Insert the events, alerts and outbox rows, upsert the devices and delete the
        delivered outbox rows of ``prepare`` in one transaction; raise sqlite3 errors."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._commit, *prepared)

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` with this writer's connection on its thread, between two commits.

        Other work waits for it as for a commit (no busy-handler sleeps), so maintenance
        that runs here in short transactions delays a batch by one transaction at most.
        ``work`` owns its transaction (BEGIN IMMEDIATE ... COMMIT).
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: work(self._connection()))

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
            conn.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_LIMIT_BYTES}")
            self._conn = conn
        return self._conn

    def _commit(
        self,
        rows: list[tuple[Any, ...]],
        devices: list[tuple[Any, ...]],
        alerts: list[tuple[Any, ...]],
        outbox: list[tuple[Any, ...]],
        deletes: list[str],
        state: list[tuple[Any, ...]],
        state_deletes: list[tuple[Any, ...]],
    ) -> None:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            insert_rows(conn, INSERT_EVENTS, rows)
            insert_rows(conn, UPSERT_DEVICES, devices)
            insert_rows(conn, INSERT_ALERTS, alerts)
            insert_rows(conn, INSERT_OUTBOX, outbox)
            delete_rows(conn, deletes)
            if state:
                conn.executemany(UPSERT_RULE_STATE, state)
            if state_deletes:
                conn.executemany(DELETE_RULE_STATE, state_deletes)
            faults.hit("db_io_error")
            faults.hit("disk_full")
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


__all__ = ["DeviceSummary", "PreparedBatch", "SqliteBatchWriter", "SqliteTime", "event_rows"]
