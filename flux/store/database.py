"""Engine creation: SQLite (aiosqlite, WAL) by default, PostgreSQL (asyncpg) by URL.

SQLite runs in WAL mode with ``synchronous=FULL`` by default: an acknowledged message must
survive a power loss, and with batched commits the one fsync per batch is cheap. NORMAL is
one config line away for boxes where losing the last commits on power loss is acceptable.
Writes start with ``BEGIN IMMEDIATE`` so a writer takes the lock up front instead of failing
with "database is locked" halfway through a batch; readers start deferred transactions.
"""

from __future__ import annotations

import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.engine.url import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from flux.config import DatabaseConfig
from flux.events import Event
from flux.metrics import DB_CONNECTIONS_ACTIVE, DB_CONNECTIONS_IDLE

#: Execution option that marks a connection as a writer (``BEGIN IMMEDIATE`` on SQLite).
WRITE_OPTION = "flux_write"
SQLITE_BUSY_TIMEOUT_MS = 5000
#: The WAL file is cut back to this size when a checkpoint lets SQLite start it over: a
#: burst (or a long reader holding checkpoints back) would otherwise leave it at its
#: largest for good. About SQLite's checkpoint interval of 1000 pages.
SQLITE_WAL_LIMIT_BYTES = 4 * 1024 * 1024


def utc_datetime(timestamp: float) -> datetime:
    """A UNIX timestamp as an aware UTC datetime, as the ``Timestamp`` columns take it."""
    return datetime.fromtimestamp(timestamp, UTC)


def json_text(value: Any) -> str:
    """Serialize a JSON column value (orjson: NaN refused, as on ingest)."""
    return orjson.dumps(value).decode()


def payload_text(stored: Event) -> str:
    """The ``payload`` column of an event: a derived event's raw bytes are its payload's
    JSON already (``derive_event``), so they are not serialized a second time."""
    if stored.source == "derived":
        return stored.raw.decode()
    return orjson.dumps(stored.payload).decode()


def sqlite_path(url: str) -> Path | None:
    """Return the database file of a SQLite URL, or None for in-memory databases."""
    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database)


def create_engine(config: DatabaseConfig) -> AsyncEngine:
    """Create the async engine with the dialect's pragmas and transaction handling installed."""
    pool = {
        "pool_size": config.pool_size,
        "max_overflow": config.max_overflow,
        "pool_timeout": config.pool_timeout_s,
        "pool_recycle": config.pool_recycle_s or -1,
    }
    if config.is_sqlite:
        path = sqlite_path(config.url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            config.url,
            json_serializer=json_text,
            json_deserializer=orjson.loads,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            **pool,
        )
        _install_sqlite_hooks(engine, synchronous=config.sqlite_synchronous)
        return engine
    return create_async_engine(
        config.url,
        json_serializer=json_text,
        json_deserializer=orjson.loads,
        pool_pre_ping=True,
        **pool,
    )


def export_pool_metrics(engine: AsyncEngine) -> None:
    """Report ``engine``'s pool as ``flux_db_connections_active`` and ``_idle``.

    Read at scrape time (nothing per checkout); the newest engine owns the gauges, and a
    weak reference lets a disposed engine go (its gauges then read 0).
    """
    sync_engine = weakref.ref(engine.sync_engine)

    def count(method: str) -> float:
        current = sync_engine()
        if current is None:
            return 0.0
        counter = getattr(current.pool, method, None)  # pools without a queue count nothing
        return float(counter()) if callable(counter) else 0.0

    DB_CONNECTIONS_ACTIVE.set_function(lambda: count("checkedout"))
    DB_CONNECTIONS_IDLE.set_function(lambda: count("checkedin"))


def _install_sqlite_hooks(engine: AsyncEngine, *, synchronous: str) -> None:
    """Set pragmas on every new connection and take over BEGIN from the sqlite3 driver."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook emit BEGIN itself (the pysqlite recipe).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_LIMIT_BYTES}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        options = connection.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return  # e.g. a migration's VACUUM, which no transaction may hold
        immediate = options.get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


async def writer_connection(engine: AsyncEngine) -> AsyncConnection:
    """Open a connection whose transactions take the write lock immediately."""
    connection = await engine.connect()
    return await connection.execution_options(**{WRITE_OPTION: True})


__all__ = [
    "SQLITE_BUSY_TIMEOUT_MS",
    "SQLITE_WAL_LIMIT_BYTES",
    "WRITE_OPTION",
    "create_engine",
    "export_pool_metrics",
    "json_text",
    "sqlite_path",
    "utc_datetime",
    "writer_connection",
]
