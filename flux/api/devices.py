"""Device queries: the device list, one device, and its latest events."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from flux.api.gateway import Database, Gateway
from flux.errors import NotFound
from flux.store import queries

router = APIRouter(tags=["devices"])

DeviceId = Annotated[str, Path(min_length=1, max_length=255)]


@router.get("/devices")
async def list_devices(
    engine: Database,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> list[dict[str, Any]]:
    """List known devices with first/last seen, message count and last payload."""
    return await queries.list_devices(engine, limit=limit, offset=offset)


@router.get("/devices/{device_id}", responses={404: {"description": "unknown device"}})
async def get_device(engine: Database, device_id: DeviceId) -> dict[str, Any]:
    device = await queries.get_device(engine, device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}", device_id=device_id)
    return device


@router.get("/devices/{device_id}/events")
async def device_events(
    engine: Database,
    device_id: DeviceId,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Return a device's newest events, newest first."""
    return await queries.device_events(engine, device_id, limit=limit)


@router.get("/alerts")
async def alerts(
    engine: Database,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    device_id: Annotated[str | None, Query(max_length=255)] = None,
    rule_id: Annotated[str | None, Query(max_length=64)] = None,
) -> list[dict[str, Any]]:
    """Return the newest alerts, optionally filtered by device or rule."""
    return await queries.list_alerts(
        engine, limit=limit, device_id=device_id, rule_id=rule_id
    )


@router.get("/status")
async def status(gateway: Gateway) -> dict[str, Any]:
    """One-call overview: readiness, degraded reasons, asyncio tasks, bus, rules, plugins."""
    rules = gateway.rules.rules()
    by_status: dict[str, int] = {}
    for rule in rules:
        by_status[rule.status] = by_status.get(rule.status, 0) + 1
    pools = gateway.plugins.all_stats()
    return {
        "ready": gateway.readiness(),
        "degraded": gateway.degraded(),
        "tasks": len(asyncio.all_tasks()),
        "bus_depth": gateway.bus.depth(),
        "bus_capacity": gateway.bus.capacity,
        "bus_overflow": gateway.bus.overflow_policies(),
        "mqtt_pending": gateway.mqtt.pending,
        "rules": {"version": gateway.rules.version, **by_status},
        "plugins": {name: stats.as_dict() for name, stats in pools.items()},
    }


@router.get("/dead-letters")
async def dead_letters(
    engine: Database, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[dict[str, Any]]:
    """Return the newest dead letters with their reason."""
    return await queries.list_dead_letters(engine, limit=limit)


__all__ = ["router"]
