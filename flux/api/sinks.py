"""Sinks over HTTP: their backlog and state, pause and resume."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from flux.api.gateway import SinksOf

router = APIRouter(tags=["sinks"])

SinkName = Annotated[str, Path(min_length=1, max_length=64)]


@router.get("/sinks")
async def list_sinks(sinks: SinksOf) -> list[dict[str, Any]]:
    """Every sink: backlog rows and bytes, the oldest row's age, send rate, last error."""
    return sinks.describe()


@router.get("/sinks/{name}", responses={404: {"description": "unknown sink"}})
async def get_sink(sinks: SinksOf, name: SinkName) -> dict[str, Any]:
    return sinks.describe_one(name)


@router.post("/sinks/{name}/pause", responses={404: {"description": "unknown sink"}})
async def pause_sink(sinks: SinksOf, name: SinkName) -> dict[str, Any]:
    """Stop sending (rows keep being stored in the outbox, in order)."""
    return sinks.pause(name)


@router.post("/sinks/{name}/resume", responses={404: {"description": "unknown sink"}})
async def resume_sink(sinks: SinksOf, name: SinkName) -> dict[str, Any]:
    """Send again, from the oldest row waiting."""
    return sinks.resume(name)


__all__ = ["router"]
