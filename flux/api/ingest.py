"""Event ingest over HTTP: treated exactly like an MQTT message, answered after commit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from flux.api.gateway import Gateway, GatewayView
from flux.errors import InvalidEvent, NotReady, StoreUnavailable
from flux.events import (
    MAX_DEPTH,
    REASON_TOO_DEEP,
    DeadLetter,
    Event,
    FutureAck,
    json_bytes,
    make_event,
    nesting_depth,
)


class _StrictJsonRoute(APIRoute):
    """Parse request bodies with orjson, as MQTT payloads are parsed.

    FastAPI's ``json`` accepts NaN, Infinity and integers of any size; orjson refuses NaN
    and Infinity and reads integers beyond 64 bits as floats, so an HTTP event and the same
    message over MQTT get the same treatment.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_json(request: Request) -> Response:
            body = await request.body()
            if body:
                try:
                    request._json = orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    raise InvalidEvent(
                        f"the body is not valid JSON: {exc}", reason="invalid_json"
                    ) from None
            return await handler(request)

        return strict_json


router = APIRouter(tags=["events"], route_class=_StrictJsonRoute)

MAX_BATCH_EVENTS = 10_000


class EventIn(BaseModel):
    topic: str = Field(min_length=1, max_length=1024, examples=["devices/dev-1/telemetry"])
    payload: dict[str, Any] = Field(examples=[{"temperature": 31.5, "humidity": 40}])


class StoredEvent(BaseModel):
    id: str
    topic: str
    device_id: str | None


class StoredEvents(BaseModel):
    count: int
    ids: list[str]


def to_event(
    topic: str, payload: dict[str, Any], *, max_bytes: int, index: int | None = None
) -> Event:
    """Turn a posted event into an Event exactly as an MQTT message would be (or raise)."""
    where = f"events[{index}]: " if index is not None else ""
    try:
        raw = json_bytes(payload)
    except orjson.JSONEncodeError as exc:
        if nesting_depth(payload) > MAX_DEPTH:  # as over MQTT (decode_payload)
            raise InvalidEvent(
                f"{where}payload nests deeper than {MAX_DEPTH} levels", reason=REASON_TOO_DEEP
            ) from None
        raise InvalidEvent(
            f"{where}payload cannot be stored: {exc}", reason="invalid_json"
        ) from None
    created = make_event(topic, raw, max_bytes=max_bytes, source="http")
    if isinstance(created, DeadLetter):
        raise InvalidEvent(where + created.detail, reason=created.reason)
    return created


async def store(gateway: GatewayView, batch: list[Event]) -> None:
    """Deliver ``batch`` to the bus and wait until every event is committed."""
    if not gateway.accepting:
        raise NotReady("the gateway is not accepting events (starting or stopping)")
    loop = asyncio.get_running_loop()
    futures = []
    for event in batch:
        future: asyncio.Future[None] = loop.create_future()
        event.ack = FutureAck(future)
        futures.append(future)
    timeout = gateway.settings.server.request_timeout_s
    try:
        # asyncio.timeout, not wait_for: no extra task per request.
        async with asyncio.timeout(timeout):
            await gateway.bus.deliver_many(batch)
        async with asyncio.timeout(timeout):
            for future in futures:
                await future
    except TimeoutError:
        raise StoreUnavailable(
            f"events were accepted but not committed within {timeout:g}s; they may still be "
            "stored, check by id before retrying",
            ids=[event.id for event in batch],
        ) from None


@router.post(
    "/event",
    status_code=201,
    response_model=StoredEvent,
    responses={422: {"description": "invalid event"}, 503: {"description": "not stored"}},
)
async def post_event(gateway: Gateway, item: Annotated[EventIn, Body()]) -> StoredEvent:
    """Ingest one event; 201 once it is committed to the database."""
    max_bytes = gateway.settings.mqtt.max_payload_bytes
    event = to_event(item.topic, item.payload, max_bytes=max_bytes)
    await store(gateway, [event])
    return StoredEvent(id=event.id, topic=event.topic, device_id=event.device_id)


@router.post(
    "/events",
    status_code=201,
    response_model=StoredEvents,
    responses={422: {"description": "invalid event"}, 503: {"description": "not stored"}},
)
async def post_events(
    gateway: Gateway,
    items: Annotated[list[EventIn], Body(max_length=MAX_BATCH_EVENTS)],
) -> StoredEvents:
    """Ingest a batch in order; validated as a whole (one bad event rejects the batch)."""
    max_bytes = gateway.settings.mqtt.max_payload_bytes
    batch = [
        to_event(item.topic, item.payload, max_bytes=max_bytes, index=i)
        for i, item in enumerate(items)
    ]
    await store(gateway, batch)
    return StoredEvents(count=len(batch), ids=[event.id for event in batch])


__all__ = ["router", "store", "to_event"]
