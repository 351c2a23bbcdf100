"""Retention on a real SQLite file and a real PostgreSQL: age limits, the size budget, and
a purge that never holds ingest up."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, insert, select

from flux import faults
from flux.app import GatewayState
from flux.config import RETAINED_TABLES, DatabaseConfig, Settings
from flux.store.database import SQLITE_WAL_LIMIT_BYTES, create_engine
from flux.store.migrate import upgrade, upgrade_async
from flux.store.retention import (
    BATCH_ROWS,
    KEEP_FREE,
    RETAINED,
    PostgresRetention,
    Retention,
)
from flux.store.schema import alerts, dead_letters, events, outbox
from flux.store.sqlite_batch import SqliteTime
from flux.workers import worker_overrides
from tests.harness import Db, make_settings, metric_value, unique, wait_until

DAY = 86_400.0
_serial = count()


def event_id_at(timestamp: float) -> str:
    """An event id as the gateway makes them (milliseconds first), for a row at ``timestamp``."""
    return f"{int(timestamp * 1000):012x}{0xFEEDBEEF:08x}{next(_serial):012x}"


def event_row(device: str, days_ago: float, seq: int = 0) -> dict[str, Any]:
    at = time.time() - days_ago * DAY
    return {
        "id": event_id_at(at),
        "device_id": device,
        "topic": f"devices/{device}/telemetry",
        "payload": {"seq": seq, "days_ago": days_ago},
        "received_at": datetime.fromtimestamp(at, UTC),
        "source": "mqtt",
        "hops": 0,
    }


def alert_row(device: str, days_ago: float) -> dict[str, Any]:
    return {
        "rule_id": "hot",
        "device_id": device,
        "event_id": None,
        "severity": "warning",
        "output": {"days_ago": days_ago},
        "created_at": datetime.now(UTC) - timedelta(days=days_ago),
    }


def dead_letter_row(device: str, days_ago: float) -> dict[str, Any]:
    return {
        "topic": f"devices/{device}/telemetry",
        "payload": b"not json",
        "reason": "invalid_json",
        "detail": f"{days_ago} days ago",
        "source": "mqtt",
        "received_at": datetime.now(UTC) - timedelta(days=days_ago),
    }


def outbox_row(days_ago: float) -> dict[str, Any]:
    """An undelivered webhook, queued ``days_ago`` and not due again for a year."""
    created = datetime.now(UTC) - timedelta(days=days_ago)
    return {
        "id": f"{int(created.timestamp() * 1000):012x}{'0' * 20}",
        "sink": "webhooks",
        "rule_id": "hot",
        "event_id": None,
        "topic": "http://127.0.0.1:9/hook",
        "headers": {},
        "payload": b"{}",
        "timeout_s": 1.0,
        "attempts": 3,
        "next_attempt_at": datetime.now(UTC) + timedelta(days=365),
        "claim_token": None,
        "last_error": "connection refused",
        "created_at": created,
    }


def purged(table: str, reason: str) -> float:
    """``flux_retention_purged_total`` of this process (the gateways run in it)."""
    value = REGISTRY.get_sample_value(
        "flux_retention_purged_total", {"table": table, "reason": reason}
    )
    return value or 0.0


async def insert_rows(db: Db, table: Any, rows: list[dict[str, Any]]) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(insert(table), rows)


async def ages_left(db: Db, table: Any, column: str) -> list[float]:
    """The ``days_ago`` of every row left (kept in the payload, output or detail)."""
    async with db.engine.connect() as conn:
        values = (await conn.execute(select(table.c[column]))).scalars().all()
    if column == "detail":
        return sorted(float(value.split()[0]) for value in values)
    return sorted(float(value["days_ago"]) for value in values)


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file, or a PostgreSQL database of the test's own (skipped where none runs)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/flux.db"
    url: str = request.getfixturevalue("pg_url")
    return url


# -- age ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
@pytest.mark.parametrize(
    ("database", "kept"),
    [
        # 30 days for all, a year of alerts, dead letters forever.
        (
            {"retention_days": 30, "alerts_retention_days": 365, "dead_letters_retention_days": 0},
            {"events": [0.0, 20.0], "alerts": [40.0], "dead_letters": [40.0, 4000.0]},
        ),
        # Nothing but events is purged, after a week.
        (
            {"retention_days": 0, "events_retention_days": 7},
            {"events": [0.0], "alerts": [40.0, 400.0], "dead_letters": [40.0, 4000.0]},
        ),
    ],
)
async def test_rows_past_their_retention_go_at_the_next_check_and_recent_ones_stay(
    tmp_path: Path,
    broker: tuple[str, int],
    start_gateway: Any,
    database_url: str,
    database: dict[str, Any],
    kept: dict[str, list[float]],
) -> None:
    dev = unique("dev")
    settings = make_settings(
        tmp_path,
        broker,
        device_ids=[dev],
        database_url=database_url,
        database={"retention_interval_s": 0.2, **database},
    )
    async with start_gateway(settings) as gateway:
        db = Db(database_url)
        try:
            # More old events than one delete batch takes, so the purge goes batch by batch.
            old_events = [event_row(dev, 40, seq) for seq in range(BATCH_ROWS * 2 + 7)]
            await insert_rows(db, events, [*old_events, event_row(dev, 20), event_row(dev, 0)])
            await insert_rows(db, alerts, [alert_row(dev, 400), alert_row(dev, 40)])
            await insert_rows(
                db, dead_letters, [dead_letter_row(dev, 4000), dead_letter_row(dev, 40)]
            )
            await insert_rows(db, outbox, [outbox_row(400)])
            # A check that started after the rows were written has come to its end.
            checks = gateway.retention.checks
            await wait_until(lambda: gateway.retention.checks >= checks + 2, what="two checks")
            assert await ages_left(db, events, "payload") == kept["events"]
            assert await ages_left(db, alerts, "output") == kept["alerts"]
            assert await ages_left(db, dead_letters, "detail") == kept["dead_letters"]
            # An undelivered webhook stays, however old: it can still be delivered.
            assert await db.count(outbox) == 1
        finally:
            await db.close()


async def test_a_failed_check_is_logged_counted_and_done_at_the_next_one(
    tmp_path: Path,
    broker: tuple[str, int],
    start_gateway: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dev = unique("dev")
    settings = make_settings(
        tmp_path, broker, device_ids=[dev], database={"retention_interval_s": 0.2}
    )
    async with start_gateway(settings) as gateway:
        db = Db(settings.database.url)
        try:
            await wait_until(lambda: gateway.retention.checks >= 1, what="a first check")
            errors = REGISTRY.get_sample_value("flux_retention_errors_total") or 0.0
            purged_before = purged("events", "age")
            faults.arm("disk_full:1")  # the next write fails, as on a full disk
            try:
                await insert_rows(db, events, [event_row(dev, 40), event_row(dev, 0)])
                await wait_until(
                    lambda: REGISTRY.get_sample_value("flux_retention_errors_total") == errors + 1,
                    what="a failed check counted",
                )
            finally:
                faults.disarm()
            await wait_until(
                lambda: purged("events", "age") > purged_before,
                what="the old event purged by a later check",
            )
            assert await ages_left(db, events, "payload") == [0.0]
            assert gateway.state is GatewayState.RUNNING
        finally:
            await db.close()
    failed = [r.getMessage() for r in caplog.records if "retention check failed" in r.getMessage()]
    assert len(failed) == 1 and "database or disk is full" in failed[0], failed


# -- size -----------------------------------------------------------------------------------------


def _files_within(path: Path, limit: float) -> bool:
    """The database file within ``limit`` bytes, and its WAL within SQLite's limit."""
    wal = Path(f"{path}-wal")
    return path.stat().st_size <= limit and wal.stat().st_size <= SQLITE_WAL_LIMIT_BYTES


async def test_a_5_mb_budget_holds_under_a_50000_message_load(
    tmp_path: Path, broker: tuple[str, int], serve_gateway: Any
) -> None:
    dev = unique("dev")
    budget_mb = 5
    settings = make_settings(
        tmp_path,
        broker,
        device_ids=[dev],
        database={"max_size_mb": budget_mb, "retention_interval_s": 1.0},
    )
    path = tmp_path / "flux.db"
    total, per_request = 50_000, 500
    async with (
        serve_gateway(settings) as (_gateway, server),
        httpx.AsyncClient(base_url=server.url, timeout=60) as client,
    ):
        for start in range(0, total, per_request):
            batch = [
                {
                    "topic": f"devices/{dev}/telemetry",
                    "payload": {"seq": seq, "temperature": 21.5 + seq % 10, "humidity": 40},
                }
                for seq in range(start, start + per_request)
            ]
            response = await client.post("/api/v1/events", json=batch)
            assert response.status_code == 201, response.text
        limit = budget_mb * 1024 * 1024 * 1.2

        async def within_budget() -> bool:
            """The file and the size the gateway reports (as SQLite counts it: pages not
            yet checkpointed from the WAL included, so the two can differ for a moment)."""
            reported = metric_value((await client.get("/metrics")).text, "flux_db_size_bytes")
            return _files_within(path, limit) and reported is not None and reported <= limit

        await wait_until(
            within_budget,
            timeout=90,
            what=f"the database within {limit:.0f} bytes (file and metric), the WAL in its limit",
        )
        metrics = (await client.get("/metrics")).text
        size_purged = metric_value(
            metrics, "flux_retention_purged_total", table="events", reason="size"
        )
        assert size_purged is not None and size_purged > 0
    # What is left is the newest: the last message is there, and thousands before it.
    with sqlite3.connect(path) as conn:
        seqs = [
            int(row[0])
            for row in conn.execute("SELECT json_extract(payload, '$.seq') FROM events")
        ]
    assert max(seqs) == total - 1
    assert len(seqs) > 5_000
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))


@pytest.mark.postgres
async def test_postgres_cuts_the_excess_once_until_the_tables_outgrow_it(pg_url: str) -> None:
    """PostgreSQL keeps deleted rows' space for new ones: one cut by the excess, and no
    more until the tables grow past their size at that cut."""
    await upgrade_async(DatabaseConfig(url=pg_url))
    engine = create_engine(DatabaseConfig(url=pg_url))
    db = Db(pg_url)
    database = PostgresRetention(engine)
    try:
        rows = [event_row("pg", 1 - seq / 20_000, seq) for seq in range(20_000)]
        await insert_rows(db, events, rows)
        size = await database.size()
        retention = Retention(
            database=database, days={}, max_size_bytes=size // 2, interval_s=60
        )
        purged = await retention.check()
        cut = purged[("events", "size")]
        assert 6_000 <= cut <= 14_000, cut  # about half, by the average row
        async with db.engine.connect() as conn:
            oldest = (await conn.execute(select(func.min(events.c.id)))).scalar_one()
        assert oldest == rows[cut]["id"]  # the oldest went first
        assert await retention.check() == {}  # no growth: no second cut
        await insert_rows(db, events, [event_row("pg", 0, seq) for seq in range(20_000, 40_000)])
        assert (await retention.check())[("events", "size")] > 0
    finally:
        await db.close()
        await engine.dispose()


# -- a big purge and ingest at the same time ------------------------------------------------------


def seed_old_events(path: Path, rows: int) -> str:
    """Write ``rows`` events 60 days old straight into the file; return the newest one's id."""
    upgrade(DatabaseConfig(url=f"sqlite+aiosqlite:///{path}"))
    base = time.time() - 60 * DAY
    stamp = SqliteTime()
    ids = [event_id_at(base + i / 1000) for i in range(rows)]
    payload = '{"seq": 0, "temperature": 21.5, "humidity": 40, "note": "seeded"}'
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO events VALUES (?, 'old', 'devices/old/telemetry', ?, ?, 'mqtt', 0)",
            ((ids[i], payload, stamp(base + i / 1000)) for i in range(rows)),
        )
    return ids[-1]


async def test_ingest_is_acknowledged_while_a_big_purge_runs(
    tmp_path: Path, broker: tuple[str, int], serve_gateway: Any
) -> None:
    dev = unique("dev")
    path = tmp_path / "flux.db"
    newest_old = await asyncio.to_thread(seed_old_events, path, 200_000)
    seeded_size = path.stat().st_size
    settings = make_settings(
        tmp_path, broker, device_ids=[dev], database={"retention_days": 30}
    )
    reader = sqlite3.connect(tmp_path / "flux.db")

    def purging() -> bool:
        row = reader.execute("SELECT 1 FROM events WHERE id = ?", (newest_old,)).fetchone()
        return row is not None

    before = purged("events", "age")
    async with (
        serve_gateway(settings) as (_gateway, server),
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
    ):
        await wait_until(lambda: purged("events", "age") > before, what="the purge under way")
        acknowledged_while_purging = 0
        seq = 0
        while purging():
            response = await client.post(
                "/api/v1/event",
                json={"topic": f"devices/{dev}/telemetry", "payload": {"seq": seq}},
            )
            assert response.status_code == 201, response.text
            seq += 1
            if purging():
                acknowledged_while_purging += 1
        # The file gives the space of the purged rows back, but for a tenth kept free.
        def shrunk() -> bool:
            pages, free = (
                reader.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("page_count", "freelist_count")
            )
            return path.stat().st_size < seeded_size / 10 and free <= pages * KEEP_FREE

        await wait_until(shrunk, what="the file shrunk")
    reader.close()
    assert acknowledged_while_purging >= 10
    with sqlite3.connect(tmp_path / "flux.db") as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE device_id = 'old'").fetchone() == (
            0,
        )
        stored = conn.execute(
            "SELECT count(*) FROM events WHERE device_id = ?", (dev,)
        ).fetchone()[0]
    assert stored == seq


# -- the schema and the workers ------------------------------------------------------------------


def test_the_migration_turns_on_incremental_vacuum_and_keeps_the_rows(tmp_path: Path) -> None:
    config = DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/flux.db")
    upgrade(config, "0002")
    seed_path = tmp_path / "flux.db"
    with sqlite3.connect(seed_path) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (0,)
        conn.execute(
            "INSERT INTO events VALUES ('a', 'd', 'devices/d/telemetry', '{}', "
            "'2026-01-01 00:00:00.000000', 'mqtt', 0)"
        )
    upgrade(config)
    with sqlite3.connect(seed_path) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental
        assert conn.execute("SELECT id FROM events").fetchall() == [("a",)]


def test_every_retained_table_has_its_setting() -> None:
    assert tuple(RETAINED) == RETAINED_TABLES
    config = DatabaseConfig(retention_days=9, alerts_retention_days=0)
    assert [config.retention_days_of(t) for t in RETAINED] == [9, 0, 9]


def test_only_worker_0_purges_a_shared_database() -> None:
    settings = Settings.model_validate(
        {"database": {"retention_days": 9, "alerts_retention_days": 99, "max_size_mb": 50}}
    )
    assert worker_overrides(settings, 0).keys().isdisjoint(
        {"FLUX_DATABASE__RETENTION_DAYS", "FLUX_DATABASE__MAX_SIZE_MB"}
    )
    second = worker_overrides(settings, 1)
    assert {key: second[key] for key in second if key.startswith("FLUX_DATABASE__")} == {
        "FLUX_DATABASE__RETENTION_DAYS": "0",
        "FLUX_DATABASE__EVENTS_RETENTION_DAYS": "0",
        "FLUX_DATABASE__ALERTS_RETENTION_DAYS": "0",
        "FLUX_DATABASE__DEAD_LETTERS_RETENTION_DAYS": "0",
        "FLUX_DATABASE__MAX_SIZE_MB": "0",
    }
