"""What the gateway's own metrics say: the tuning report and the dashboard's history."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from flux.api.gateway import Gateway
from flux.tuning import inputs_for, tuning_report

router = APIRouter(tags=["operations"])


@router.get("/report")
async def report(gateway: Gateway) -> dict[str, Any]:
    """Per-stage utilisation over the sampled window (``metrics.history_s``) and advice:
    each entry names a ``setting``, its ``current`` and ``suggested`` value and the figures
    behind it (``reason``)."""
    window, samples = gateway.sampler.window()
    inputs = inputs_for(gateway.settings, gateway.plugins, pipeline_batch=gateway.pipeline_batch)
    return tuning_report(window, samples, inputs)


@router.get("/history")
async def history(
    gateway: Gateway,
    since: Annotated[float | None, Query(ge=0, description="points after this UNIX time")] = None,
) -> dict[str, Any]:
    """The dashboard's charts: one point per ``metrics.sample_interval_s`` over the last
    ``metrics.history_s`` (events/s in and stored, receipt-to-commit latency p50/p99, bus
    depth and capacity, rule matches/s per rule, dead letters/s per reason)."""
    sampler = gateway.sampler
    return {
        "interval_s": sampler.interval_s,
        "history_s": sampler.history_s,
        "points": sampler.points(since),
    }


__all__ = ["router"]
