"""Outbox rows: what a sink will send, rendered when the event or the rule action is stored."""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flux.events import Event, json_bytes, new_event_id


@dataclass(slots=True)
class OutboxRow:
    """One message for one sink, committed with the batch that caused it.

    ``id`` sorts by creation, so a sink sends its rows in that order; ``topic`` is the
    destination (an MQTT topic, or a webhook's URL).
    """

    id: str
    sink: str
    topic: str
    payload: bytes
    created_at: float
    device_id: str | None = None
    event_id: str | None = None
    rule_id: str | None = None
    qos: int = 1
    retain: bool = False
    hops: int = 0
    headers: dict[str, str] | None = None
    timeout_s: float | None = None

    @property
    def size(self) -> int:
        """What the row weighs in the backlog budget (its payload and destination)."""
        return len(self.payload) + len(self.topic)


class TopicTemplate:
    """A sink's ``topic`` template (``site-7/{topic}``), parsed once."""

    __slots__ = ("_literal", "_parts")

    def __init__(self, template: str) -> None:
        parts = list(string.Formatter().parse(template))
        self._literal = template if all(name is None for _, name, _, _ in parts) else None
        self._parts = [(text, name) for text, name, _, _ in parts]

    def render(self, values: Mapping[str, str]) -> str:
        if self._literal is not None:
            return self._literal
        return "".join(text + (values[name] if name else "") for text, name in self._parts)


def envelope(event: Event, payload: Any = None) -> bytes:
    """The JSON document that carries an event to a receiver that wants its metadata: the
    event id (to deduplicate on), topic, device, arrival time and payload."""
    return json_bytes(
        {
            "id": event.id,
            "topic": event.topic,
            "device_id": event.device_id,
            "received_at": event.received_at,
            "payload": event.payload if payload is None else payload,
        }
    )


def template_values(event: Event, *, gateway: str, rule_id: str | None = None) -> dict[str, str]:
    """What a sink's topic template may name, for ``event``."""
    return {
        "topic": event.topic,
        "device_id": event.device_id or "",
        "rule_id": rule_id or "",
        "gateway": gateway,
        "event_id": event.id,
    }


def new_row_id() -> str:
    """A sortable id for a new row (the same format as event ids)."""
    return new_event_id()


__all__ = ["OutboxRow", "TopicTemplate", "envelope", "new_row_id", "template_values"]
