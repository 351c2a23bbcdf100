"""The bench's database: SQLite or a scratch PostgreSQL database, read as the gateway fills it."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

DEFAULT_PG_URL = "postgresql+asyncpg://127.0.0.1:5432/test"


def dsn(url: str) -> str:
    """The asyncpg form of a SQLAlchemy ``postgresql+asyncpg://`` URL."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def redact(url: str) -> str:
    """The URL without its password, for the report."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def pg_execute(url: str, sql: str) -> Any:
    """Run one statement on its own connection; return the first value of its result."""
    import asyncpg

    async def run() -> Any:
        conn = await asyncpg.connect(dsn(url), timeout=5)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


#: PostgreSQL latency watcher: how often (s) and how far behind the newest id seen (ms) to
#: look again for rows that committed out of id order (several workers): often and near, and
#: now and then far.
CATCHUPS = ((0.02, 500), (1.0, 10_000))


class ScratchPostgres:
    """A database of the bench's own on a PostgreSQL server: created on entry, dropped on exit."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.name = f"flux_bench_{uuid.uuid4().hex[:10]}"
        self.url = with_database(server_url, self.name)

    def probe(self) -> str:
        """Return why the server cannot be used, or '' when it answers."""
        try:
            pg_execute(self.server_url, "SELECT 1")
        except Exception as exc:
            where = urlsplit(self.server_url).netloc.rsplit("@", 1)[-1]
            return f"PostgreSQL at {where} does not answer: {exc!r}"
        return ""

    def __enter__(self) -> ScratchPostgres:
        pg_execute(self.server_url, f'CREATE DATABASE "{self.name}"')
        return self

    def __exit__(self, *exc_info: object) -> None:
        pg_execute(self.server_url, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


#: Empty every table of the scratch database but the migration version, in one statement.
TRUNCATE_ALL = """
DO $$ DECLARE names text; BEGIN
  SELECT string_agg(quote_ident(tablename), ', ') INTO names
  FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version';
  IF names IS NOT NULL THEN EXECUTE 'TRUNCATE ' || names; END IF;
END $$
"""


class Reader(Protocol):
    """Reads the events table from one thread on a connection of its own."""

    late: int

    def count(self) -> int: ...

    def new_payloads(self) -> list[Any]: ...

    def close(self) -> None: ...


class SqliteReader:
    """Count stored events and read new ones by rowid (commit order, even with several writers)."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, timeout=30)
        self._last = 0
        self.late = 0

    def count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM events WHERE hops = 0").fetchone()[0])

    def new_payloads(self) -> list[Any]:
        rows = self._conn.execute(
            "SELECT rowid, payload FROM events WHERE hops = 0 AND rowid > ? ORDER BY rowid",
            (self._last,),
        ).fetchall()
        if rows:
            self._last = rows[-1][0]
        return [payload for _, payload in rows]

    def close(self) -> None:
        self._conn.close()


class PostgresReader:
    """Count stored events and read new ones by the time-ordered event id.

    Ids sort by creation time (48-bit milliseconds first) and one writer commits them in
    that order; several workers do not, so the ids just behind the newest one seen are
    looked at again (``CATCHUPS``) and rows missed are returned then, counted in ``late``
    (their latency is late by up to 20 ms).
    """

    def __init__(self, url: str) -> None:
        import asyncpg

        self._loop = asyncio.new_event_loop()
        self._conn = self._loop.run_until_complete(asyncpg.connect(dsn(url), timeout=10))
        self._last = ""
        self._seen: set[str] = set()
        self._next = [time.monotonic() + every for every, _ in CATCHUPS]
        self.late = 0

    def _fetch(self, sql: str, *params: Any) -> list[Any]:
        return list(self._loop.run_until_complete(self._conn.fetch(sql, *params)))

    def count(self) -> int:
        value = self._loop.run_until_complete(
            self._conn.fetchval("SELECT count(*) FROM events WHERE hops = 0")
        )
        return int(value)

    def new_payloads(self) -> list[Any]:
        rows = self._fetch(
            "SELECT id, payload FROM events WHERE hops = 0 AND id > $1 ORDER BY id", self._last
        )
        if rows:
            self._last = rows[-1]["id"]
        self._seen.update(row["id"] for row in rows)
        now = time.monotonic()
        for i, (every, lookback_ms) in enumerate(CATCHUPS):
            if now < self._next[i] or not self._last:
                continue
            self._next[i] = now + every
            floor = f"{max(0, int(self._last[:12], 16) - lookback_ms):012x}"
            ids = self._fetch(
                "SELECT id FROM events WHERE hops = 0 AND id > $1 AND id <= $2",
                floor,
                self._last,
            )
            missed = [row["id"] for row in ids if row["id"] not in self._seen]
            if missed:
                late = self._fetch("SELECT id, payload FROM events WHERE id = ANY($1)", missed)
                self._seen.update(row["id"] for row in late)
                self.late += len(late)
                rows += late
        return [row["payload"] for row in rows]

    def close(self) -> None:
        self._loop.run_until_complete(self._conn.close())
        self._loop.close()


@dataclass
class Database:
    """Where one run's gateway stores events: SQLite in the work dir, or a PostgreSQL URL."""

    url: str
    sqlite_path: Path | None = None

    @property
    def kind(self) -> str:
        return "sqlite" if self.sqlite_path is not None else "postgresql"

    def reader(self) -> Reader:
        if self.sqlite_path is not None:
            return SqliteReader(self.sqlite_path)
        return PostgresReader(self.url)

    def count(self) -> int:
        reader = self.reader()
        try:
            return reader.count()
        finally:
            reader.close()

    def device_messages(self) -> int:
        """Device messages committed (``devices.message_count``): unlike the events, no
        retention ever removes them."""
        sql = "SELECT coalesce(sum(message_count), 0) FROM devices"
        if self.sqlite_path is None:
            return int(pg_execute(self.url, sql))
        with sqlite3.connect(self.sqlite_path, timeout=30) as conn:
            return int(conn.execute(sql).fetchone()[0])

    def size_bytes(self) -> int:
        """The SQLite file and its WAL on disk (0 for PostgreSQL: see ``flux_db_size_bytes``)."""
        if self.sqlite_path is None:
            return 0
        return sum(
            Path(f"{self.sqlite_path}{suffix}").stat().st_size
            for suffix in ("", "-wal")
            if Path(f"{self.sqlite_path}{suffix}").exists()
        )

    def table_counts(self) -> dict[str, int]:
        """Rows in the tables a drain writes: events (every hop), alerts, dead letters."""
        tables = ("events", "alerts", "dead_letters")
        if self.sqlite_path is None:
            return {t: int(pg_execute(self.url, f"SELECT count(*) FROM {t}")) for t in tables}
        with sqlite3.connect(self.sqlite_path, timeout=30) as conn:
            return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables}

    def reset(self) -> None:
        if self.sqlite_path is None:
            pg_execute(self.url, TRUNCATE_ALL)  # a no-op before the first migration
            return
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.sqlite_path}{suffix}").unlink(missing_ok=True)
