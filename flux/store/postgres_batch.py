"""Event batches on PostgreSQL: asyncpg's own ``executemany`` inside one transaction.

Through SQLAlchemy's Core insert each row's parameters were processed in Python and the
batch took six round trips (checkout, BEGIN, two inserts, COMMIT, release). Here the pooled
connection's asyncpg driver runs the two prepared statements itself, encoding rows in C.
SQLAlchemy still owns the connection (pool, JSON codecs, invalidation) and every other
statement. Errors come back as SQLAlchemy's: an ``OperationalError`` for a database that is
away (connection classes 08, 53, 57 and client-side connection errors: retried), a
``DBAPIError`` for data it refuses (isolated into dead letters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from flux import faults
from flux.events import Event
from flux.rules.state import StateRow, state_params
from flux.sinks.rows import OutboxRow
from flux.store.database import json_text, payload_text, utc_datetime
from flux.store.outbox import outbox_params
from flux.store.sqlite_batch import DeviceSummary, PreparedBatch

INSERT_EVENTS = (
    "INSERT INTO events (id, device_id, topic, payload, received_at, source, hops) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7)"
)
#: As ``flux.store.sqlite_batch.UPSERT_DEVICES``: batches may commit out of order.
UPSERT_DEVICES = """
INSERT INTO devices (id, first_seen, last_seen, message_count, last_payload)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO UPDATE SET
    first_seen = LEAST(devices.first_seen, excluded.first_seen),
    last_seen = GREATEST(devices.last_seen, excluded.last_seen),
    message_count = devices.message_count + excluded.message_count,
    last_payload = CASE WHEN excluded.last_seen >= devices.last_seen
        THEN excluded.last_payload ELSE devices.last_payload END
"""
INSERT_ALERTS = (
    "INSERT INTO alerts (rule_id, device_id, event_id, severity, output, created_at) "
    "VALUES ($1, $2, $3, $4, $5, $6)"
)
INSERT_OUTBOX = (
    "INSERT INTO outbox (id, sink, device_id, event_id, rule_id, topic, payload, headers, "
    "timeout_s, qos, retain, hops, next_attempt_at, created_at) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
)
DELETE_OUTBOX = "DELETE FROM outbox WHERE id = ANY($1::varchar[])"
UPSERT_RULE_STATE = (
    "INSERT INTO rule_state (rule_id, kind, key, fingerprint, value, updated_at) "
    "VALUES ($1, $2, $3, $4, $5::jsonb, $6) ON CONFLICT (rule_id, kind, key) DO UPDATE SET "
    "fingerprint = excluded.fingerprint, value = excluded.value, updated_at = excluded.updated_at"
)
DELETE_RULE_STATE = "DELETE FROM rule_state WHERE rule_id = $1 AND kind = $2 AND key = $3"
#: SQLSTATE classes meaning "the database is away", not "the data is wrong".
_OUTAGE_CLASSES = ("08", "53", "57")


class PostgresBatchWriter:
    """Commit event batches with the asyncpg driver of a pooled SQLAlchemy connection."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def close(self) -> None:
        """Nothing to release: the connections are the engine's."""

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
        rows = [
            (
                event.id,
                event.device_id,
                event.topic,
                payload_text(event),
                utc_datetime(event.received_at),
                event.source,
                event.hops,
            )
            for event in batch
        ]
        summaries = [
            (device, utc_datetime(first), utc_datetime(last), count, json_text(payload))
            for device, first, last, count, payload in devices
        ]
        alert_values = [
            (
                alert["rule_id"],
                alert["device_id"],
                alert["event_id"],
                alert["severity"],
                json_text(alert["output"]),
                alert["created_at"],
            )
            for alert in alerts
        ]
        outbox_rows = outbox_params(outbox, utc_datetime)
        upserts, removed = state_params(state, utc_datetime) if state else ([], [])
        return rows, summaries, alert_values, outbox_rows, list(deletes), upserts, removed

    async def commit(self, prepared: PreparedBatch) -> None:
        """Insert the events, alerts and outbox rows, upsert the devices and delete the
        delivered outbox rows of ``prepare`` in one transaction; raise SQLAlchemy errors."""
        rows, summaries, alert_values, outbox_rows, deletes, state, state_deletes = prepared
        conn = await self._engine.connect()
        try:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            try:
                async with driver.transaction():
                    if rows:
                        await driver.executemany(INSERT_EVENTS, rows)
                    if summaries:
                        await driver.executemany(UPSERT_DEVICES, summaries)
                    if alert_values:
                        await driver.executemany(INSERT_ALERTS, alert_values)
                    if outbox_rows:
                        await driver.executemany(INSERT_OUTBOX, outbox_rows)
                    if deletes:
                        await driver.execute(DELETE_OUTBOX, deletes)
                    if state:
                        await driver.executemany(UPSERT_RULE_STATE, state)
                    if state_deletes:
                        await driver.executemany(DELETE_RULE_STATE, state_deletes)
                    faults.hit("db_io_error")
                    faults.hit("disk_full")
                    faults.hit("before_commit")
            except Exception as exc:
                if isinstance(exc, DBAPIError):  # an injected fault is SQLAlchemy's already
                    raise
                if _is_outage(exc):
                    await conn.invalidate()
                    raise OperationalError(INSERT_EVENTS, None, exc) from exc
                raise DBAPIError(INSERT_EVENTS, None, exc) from exc
        finally:
            await conn.close()


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, OSError | ConnectionError | TimeoutError | asyncpg.InterfaceError):
        return True  # InterfaceError: the client's side of the connection is closed or broken
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in _OUTAGE_CLASSES


__all__ = ["PostgresBatchWriter"]
