"""Rules over HTTP: list, CRUD (database rules), enable/disable, test, trace, reload."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path
from pydantic import BaseModel, Field, model_validator

from flux.api.gateway import Gateway, Rules, Sources
from flux.errors import Conflict, NotFound
from flux.rules import RuleEngine, RuleValidationError, parse_rule
from flux.rules.sources import RuleSources
from flux.rules.testing import TimedEvent

router = APIRouter(tags=["rules"])

RuleId = Annotated[str, Path(min_length=1, max_length=64)]
RuleBody = Annotated[
    dict[str, Any],
    Body(
        examples=[
            {
                "id": "overheat",
                "description": "Temperature too high while dry",
                "topic": "devices/+/telemetry",
                "when": "temperature > 30 and humidity < 60",
                "actions": [{"type": "alert", "severity": "warning"}],
            }
        ]
    ),
]


class TimedEventBody(BaseModel):
    """One message of a window rule test; ``ts`` is its arrival time (epoch seconds)."""

    payload: dict[str, Any]
    ts: float = Field(ge=0)
    device_id: str | None = Field(default=None, max_length=255)
    topic: str | None = Field(default=None, max_length=1024)


class RuleTestRequest(BaseModel):
    payload: dict[str, Any] | None = Field(
        default=None, examples=[{"temperature": 31.5, "humidity": 40}]
    )
    events: list[TimedEventBody] | None = Field(
        default=None,
        max_length=100_000,
        description="window rules: messages in arrival order; the windows that close are "
        "returned (with close_open, the still-open ones too)",
        examples=[[{"payload": {"temperature": 31.5}, "ts": 1700000000.0, "device_id": "d1"}]],
    )
    close_open: bool = False
    topic: str | None = Field(default=None, max_length=1024, examples=["devices/dev-1/telemetry"])
    device_id: str | None = Field(default=None, max_length=255)

    @model_validator(mode="after")
    def _one_form(self) -> RuleTestRequest:
        if (self.payload is None) == (self.events is None):
            raise ValueError("give either 'payload' (one message) or 'events' (a window test)")
        return self


class RuleTraceRequest(BaseModel):
    count: int = Field(default=20, ge=1, le=1000, description="evaluations to collect")
    timeout_s: float = Field(
        default=30, gt=0, le=300, description="return what came by then (complete: false)"
    )


def _status(engine: RuleEngine, rule_id: str) -> dict[str, Any]:
    status = engine.status(rule_id)
    if status is None:
        raise NotFound(f"no rule {rule_id!r}", rule_id=rule_id)
    return status.to_dict()


@router.get("/rules")
async def list_rules(engine: Rules) -> dict[str, Any]:
    """Every rule with its status (active, disabled, quarantined, error) and counters."""
    return {"version": engine.version, "rules": [s.to_dict() for s in engine.rules()]}


@router.post(
    "/rules",
    status_code=201,
    responses={409: {"description": "id exists"}, 422: {"description": "invalid rule"}},
)
async def create_rule(
    gateway: Gateway, engine: Rules, sources: Sources, body: RuleBody
) -> dict[str, Any]:
    """Create a database rule (validated and compiled first), then reload."""
    rule = parse_rule(body)
    await engine.check_rule(rule)
    if await sources.find(rule.id) is not None:
        raise Conflict(f"rule {rule.id!r} exists; use PUT to change it", rule_id=rule.id)
    saved = await sources.save(rule)
    report = await gateway.reload_rules()
    return {"rule": _status(engine, saved.id), "reload": report}


@router.get("/rules/{rule_id}", responses={404: {"description": "unknown rule"}})
async def get_rule(engine: Rules, rule_id: RuleId) -> dict[str, Any]:
    return _status(engine, rule_id)


@router.put("/rules/{rule_id}", responses={422: {"description": "invalid rule"}})
async def put_rule(
    gateway: Gateway, engine: Rules, sources: Sources, rule_id: RuleId, body: RuleBody
) -> dict[str, Any]:
    """Create or replace a rule in the database (overrides a file rule of the same id)."""
    data = {**body, "id": body.get("id", rule_id)}
    if data["id"] != rule_id:
        raise Conflict("the body's id differs from the URL's", rule_id=rule_id)
    rule = parse_rule(data)
    await engine.check_rule(rule)
    saved = await sources.save(rule)
    report = await gateway.reload_rules()
    return {"rule": _status(engine, saved.id), "reload": report}


@router.delete(
    "/rules/{rule_id}",
    responses={404: {"description": "unknown rule"}, 409: {"description": "defined in a file"}},
)
async def delete_rule(gateway: Gateway, sources: Sources, rule_id: RuleId) -> dict[str, Any]:
    """Delete a database rule; a rule defined in ``rules/`` is edited there instead."""
    deleted = await sources.delete(rule_id)
    if not deleted:
        if sources.in_files(rule_id):
            raise Conflict(
                f"rule {rule_id!r} is defined in the rules folder; edit the file "
                "(or PUT a database rule to override it)",
                rule_id=rule_id,
            )
        raise NotFound(f"no rule {rule_id!r}", rule_id=rule_id)
    return {"deleted": rule_id, "reload": await gateway.reload_rules()}


async def _set_enabled(
    gateway: Gateway, engine: RuleEngine, sources: RuleSources, rule_id: str, enabled: bool
) -> dict[str, Any]:
    rule = await sources.find(rule_id)
    if rule is None:
        raise NotFound(f"no rule {rule_id!r}", rule_id=rule_id)
    if rule.enabled != enabled:
        await sources.save(rule.model_copy(update={"enabled": enabled}))
    report = await gateway.reload_rules()
    if enabled:  # enabling also lifts a quarantine
        await engine.unquarantine(rule_id)
    return {"rule": _status(engine, rule_id), "reload": report}


@router.post("/rules/{rule_id}/enable", responses={404: {"description": "unknown rule"}})
async def enable_rule(
    gateway: Gateway, engine: Rules, sources: Sources, rule_id: RuleId
) -> dict[str, Any]:
    """Enable a rule (also lifts a quarantine)."""
    return await _set_enabled(gateway, engine, sources, rule_id, True)


@router.post("/rules/{rule_id}/disable", responses={404: {"description": "unknown rule"}})
async def disable_rule(
    gateway: Gateway, engine: Rules, sources: Sources, rule_id: RuleId
) -> dict[str, Any]:
    return await _set_enabled(gateway, engine, sources, rule_id, False)


@router.post("/rules/{rule_id}/test", responses={404: {"description": "unknown rule"}})
async def test_rule(
    engine: Rules, sources: Sources, rule_id: RuleId, body: RuleTestRequest
) -> dict[str, Any]:
    """Evaluate a rule against a sample payload: match, output and time (no actions run).

    A window rule takes ``events`` (payloads with their arrival time ``ts``) and returns the
    windows that closed, each with its output and whether ``when`` matched.
    """
    rule = await sources.find(rule_id)
    if rule is None:
        raise NotFound(f"no rule {rule_id!r}", rule_id=rule_id)
    if body.events is not None:
        if rule.window is None:
            raise RuleValidationError(
                f"rule {rule_id!r} is not a window rule; send one 'payload'", rule_id=rule_id
            )
        events = [
            TimedEvent(e.payload, e.ts, e.device_id or body.device_id, e.topic) for e in body.events
        ]
        windowed = await engine.test_window_rule(
            rule, events, topic=body.topic, close_open=body.close_open
        )
        return windowed.to_dict()
    assert body.payload is not None
    result = await engine.test_rule(rule, body.payload, body.topic, device_id=body.device_id)
    return result.to_dict()


@router.post(
    "/rules/{rule_id}/trace",
    responses={
        404: {"description": "no active rule of that id"},
        409: {"description": "too many traces running"},
    },
)
async def trace_rule(
    engine: Rules, rule_id: RuleId, body: RuleTraceRequest | None = None
) -> dict[str, Any]:
    """The next ``count`` evaluations of a rule on live traffic: input, result, output,
    time and error of each, read from the batches the gateway evaluates anyway."""
    request = body or RuleTraceRequest()
    return await engine.trace(rule_id, request.count, request.timeout_s)


@router.post("/rules/reload")
async def reload_rules(gateway: Gateway) -> dict[str, Any]:
    """Re-read ``rules/`` and the database, compile everything, swap atomically.

    Returns the new ruleset version, counts and per-rule errors with line numbers; a rule
    that fails is left out while the rest go live. Concurrent calls coalesce.
    """
    started = time.perf_counter()
    report = await gateway.reload_rules()
    report["request_seconds"] = round(time.perf_counter() - started, 6)
    return report


__all__ = ["router"]
