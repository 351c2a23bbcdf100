"""Read queries the HTTP API serves (devices, their events, dead letters)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from flux.metrics import DB_QUERY_DURATION
from flux.store.schema import alerts, dead_letters, devices, events


def _iso(value: Any) -> Any:
    """Render datetimes as ISO 8601 in UTC (SQLite hands them back without a zone)."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    return value


async def _fetch(engine: AsyncEngine, operation: str, statement: Any) -> list[dict[str, Any]]:
    started = time.perf_counter()
    async with engine.connect() as conn:
        result = await conn.execute(statement)
        rows = [{key: _iso(value) for key, value in row.items()} for row in result.mappings()]
    DB_QUERY_DURATION.labels(operation=operation).observe(time.perf_counter() - started)
    return rows


async def list_devices(engine: AsyncEngine, *, limit: int, offset: int) -> list[dict[str, Any]]:
    statement = select(devices).order_by(devices.c.id).limit(limit).offset(offset)
    return await _fetch(engine, "list_devices", statement)


async def get_device(engine: AsyncEngine, device_id: str) -> dict[str, Any] | None:
    rows = await _fetch(engine, "get_device", select(devices).where(devices.c.id == device_id))
    return rows[0] if rows else None


async def device_events(engine: AsyncEngine, device_id: str, *, limit: int) -> list[dict[str, Any]]:
    """Return the newest events of a device, newest first."""
    statement = (
        select(events)
        .where(events.c.device_id == device_id)
        .order_by(events.c.received_at.desc(), events.c.id.desc())
        .limit(limit)
    )
    return await _fetch(engine, "device_events", statement)


async def list_alerts(
    engine: AsyncEngine,
    *,
    limit: int,
    device_id: str | None = None,
    rule_id: str | None = None,
) -> list[dict[str, Any]]:
    """Return the newest alerts, optionally for one device or one rule."""
    statement = select(alerts).order_by(alerts.c.id.desc()).limit(limit)
    if device_id is not None:
        statement = statement.where(alerts.c.device_id == device_id)
    if rule_id is not None:
        statement = statement.where(alerts.c.rule_id == rule_id)
    return await _fetch(engine, "alerts", statement)


async def list_dead_letters(engine: AsyncEngine, *, limit: int) -> list[dict[str, Any]]:
    """Return the newest dead letters; the raw payload as text with undecodable bytes escaped."""
    statement = select(dead_letters).order_by(dead_letters.c.id.desc()).limit(limit)
    rows = await _fetch(engine, "dead_letters", statement)
    for row in rows:
        raw = row.pop("payload")
        row["size"] = len(raw)
        row["payload_preview"] = bytes(raw[:256]).decode("utf-8", "backslashreplace")
    return rows


__all__ = ["device_events", "get_device", "list_alerts", "list_dead_letters", "list_devices"]
