"""The Event contract shared by every stage, and the decoder that turns raw messages into events.

Every stage (bus, rules, plugins, store) sees the same ``Event``. An event is created by
ingest (MQTT or HTTP) or derived by an action or plugin; it is acknowledged exactly once,
by the store, after the batch holding it is committed.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from flux.errors import InvalidEvent

Source = Literal["mqtt", "http", "derived"]

#: Dead-letter reasons; each is also a label value of ``flux_dead_letters_total``.
REASON_TOO_LARGE = "too_large"
REASON_INVALID_UTF8 = "invalid_utf8"
REASON_INVALID_JSON = "invalid_json"
REASON_NOT_AN_OBJECT = "not_an_object"
REASON_TOPIC_TOO_LONG = "topic_too_long"
REASON_TOO_DEEP = "too_deep"

#: Deepest nesting accepted: orjson reads up to 1024 levels but writes only up to 255, and
#: every stage after ingest (store, plugins) writes the payload again.
MAX_DEPTH = 254

#: Longest topic accepted; MQTT allows 64 KiB but no device needs more than this.
MAX_TOPIC_LENGTH = 1024


def _noop() -> None:
    """Acknowledge nothing: events that need no acknowledgement use this."""


@dataclass(slots=True, eq=False)
class Event:
    """One message travelling through the gateway.

    ``ack`` is called once, by the store, after the event is durably committed; for MQTT QoS 1
    it releases the PUBACK, for HTTP it completes the request.
    """

    id: str
    topic: str
    device_id: str | None
    payload: dict[str, Any]
    raw: bytes
    received_at: float
    source: Source
    qos: int = 0
    hops: int = 0
    ack: Callable[[], None] = field(default=_noop, repr=False)

    @property
    def needs_ack(self) -> bool:
        """True when a sender waits for this event to be stored (MQTT QoS 1, HTTP)."""
        return self.ack is not _noop

    @property
    def received_datetime(self) -> datetime:
        """Return ``received_at`` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.received_at, UTC)


class FutureAck:
    """An acknowledgement hook that resolves ``future`` once (a sender awaits it).

    The store may call it after the sender gave up waiting; a resolved or cancelled
    future is left alone.
    """

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    def __call__(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


@dataclass(slots=True, eq=False)
class DeadLetter:
    """A message that could not become an event, kept with the reason so nothing is lost."""

    topic: str
    raw: bytes
    reason: str
    detail: str
    received_at: float
    source: Source
    ack: Callable[[], None] = field(default=_noop, repr=False)


@dataclass(frozen=True, slots=True)
class PublishMessage:
    """An MQTT message for the gateway to publish (a rule's ``publish`` action renders it);
    ``hops`` is the hop count it carries, as a derived event would."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    hops: int


class _IdGenerator:
    """Sortable unique ids: 48-bit milliseconds, a 32-bit random process prefix, then a
    48-bit counter.

    Ids sort by creation time (milliseconds first; a clock that steps back is held at the
    last millisecond seen) and, within a process, by creation order (the counter). Across
    processes the random prefix keeps them apart (a forked child draws its own). No lock:
    ``itertools.count`` is atomic, so ids stay unique even if threads create them.
    """

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = random.getrandbits(32) << 48
        self._counter = itertools.count(random.getrandbits(40))
        self._last_ms = 0

    def __call__(self) -> str:
        ms = time.time_ns() // 1_000_000
        if ms < self._last_ms:
            ms = self._last_ms
        else:
            self._last_ms = ms
        low = next(self._counter) & _COUNTER_MASK
        return ((ms << 80) | self._prefix | low).to_bytes(16).hex()


_COUNTER_MASK = (1 << 48) - 1
new_event_id = _IdGenerator()


def device_id_for(topic: str, payload: dict[str, Any]) -> str | None:
    """Return the device id: level two of ``devices/<id>/...``, else ``payload.device_id``."""
    if topic.startswith("devices/"):
        end = topic.find("/", 8)
        candidate = topic[8:end] if end != -1 else topic[8:]
        if candidate:
            return candidate
    value = payload.get("device_id")
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def decode_payload(raw: bytes, *, max_bytes: int) -> dict[str, Any]:
    """Decode a message body into a JSON object or raise ``InvalidEvent`` with the reason.

    orjson rejects NaN/Infinity; nesting deeper than ``MAX_DEPTH`` is refused here, since
    the payload could not be written again later. Integers beyond 64 bits are read as floats
    (their low digits are lost), as most JSON consumers would.
    """
    if len(raw) > max_bytes:
        raise InvalidEvent(
            f"payload is {len(raw)} bytes, the limit is {max_bytes}", reason=REASON_TOO_LARGE
        )
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        message = str(exc)
        reason = REASON_INVALID_UTF8 if "utf-8" in message.lower() else REASON_INVALID_JSON
        raise InvalidEvent(f"payload is not valid JSON: {message}", reason=reason) from None
    if not isinstance(value, dict):
        raise InvalidEvent(
            f"payload must be a JSON object, got {type(value).__name__}",
            reason=REASON_NOT_AN_OBJECT,
        )
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and nesting_depth(value) > MAX_DEPTH:
        raise InvalidEvent(f"payload nests deeper than {MAX_DEPTH} levels", reason=REASON_TOO_DEEP)
    return value


def nesting_depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value (iterative: no recursion limit to hit)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in item)
    return deepest


def binary_payload(raw: bytes, *, max_bytes: int) -> dict[str, Any]:
    """Wrap a binary frame so it can be stored as JSON: ``{"raw_base64": ...}``."""
    if len(raw) > max_bytes:
        raise InvalidEvent(
            f"payload is {len(raw)} bytes, the limit is {max_bytes}", reason=REASON_TOO_LARGE
        )
    return {"raw_base64": base64.b64encode(raw).decode("ascii")}


def make_event(
    topic: str,
    raw: bytes,
    *,
    max_bytes: int,
    source: Source,
    qos: int = 0,
    received_at: float | None = None,
    binary: bool = False,
) -> Event | DeadLetter:
    """Turn one raw message into an ``Event``, or a ``DeadLetter`` saying why it cannot be one.

    ``binary`` marks a topic whose payload is bytes for a plugin to decode (a sensor frame):
    it is not parsed as JSON; the event keeps ``raw`` and stores it base64-encoded.
    """
    now = time.time() if received_at is None else received_at
    if len(topic) > MAX_TOPIC_LENGTH:
        return DeadLetter(
            topic=topic[:MAX_TOPIC_LENGTH],
            raw=raw[:max_bytes],
            reason=REASON_TOPIC_TOO_LONG,
            detail=f"topic is {len(topic)} characters, the limit is {MAX_TOPIC_LENGTH}",
            received_at=now,
            source=source,
        )
    try:
        payload = (
            binary_payload(raw, max_bytes=max_bytes)
            if binary
            else decode_payload(raw, max_bytes=max_bytes)
        )
    except InvalidEvent as exc:
        return DeadLetter(
            topic=topic,
            raw=raw,
            reason=exc.reason,
            detail=exc.message,
            received_at=now,
            source=source,
        )
    return Event(
        id=new_event_id(),
        topic=topic,
        device_id=device_id_for(topic, payload),
        payload=payload,
        raw=raw,
        received_at=now,
        source=source,
        qos=qos,
    )


def json_bytes(value: Any) -> bytes:
    """``orjson.dumps(value)`` in a bytes object of its own size, for bytes kept around.

    orjson's result can keep the whole buffer it wrote into, several KiB for a short
    document: with thousands of events and publishes in flight that adds up.
    """
    return b"".join((orjson.dumps(value), b""))


def derive_event(parent: Event, *, topic: str, payload: dict[str, Any]) -> Event:
    """Create an event emitted by a rule action or a plugin; its hop count grows by one.

    ``raw`` is the payload's JSON, which the store writes as the payload: a derived event's
    payload is not changed afterwards. Raises ``orjson.JSONEncodeError`` for a payload
    that cannot be written as JSON (nested deeper than 254 levels).
    """
    raw = json_bytes(payload)
    return Event(
        id=new_event_id(),
        topic=topic,
        device_id=device_id_for(topic, payload) or parent.device_id,
        payload=payload,
        raw=raw,
        received_at=time.time(),
        source="derived",
        hops=parent.hops + 1,
    )


__all__ = [
    "MAX_DEPTH",
    "MAX_TOPIC_LENGTH",
    "DeadLetter",
    "Event",
    "FutureAck",
    "PublishMessage",
    "decode_payload",
    "derive_event",
    "device_id_for",
    "json_bytes",
    "make_event",
    "nesting_depth",
    "new_event_id",
]
