"""Outbox rows: what a sink will send, rendered when the event or the rule action is stored."""

from __future__ import annotations

import string
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
    """A sink's ``topic`` template (``site-7/{topic}``), parsed once.

    The usual templates, fixed text or ``{topic}`` with fixed text around it, render without
    building the values of the fields they do not name: this runs once per forwarded row.
    """

    __slots__ = ("_around_topic", "_literal", "_parts")

    def __init__(self, template: str) -> None:
        parts = [(text, name) for text, name, _, _ in string.Formatter().parse(template)]
        names = [name for _, name in parts if name is not None]
        self._parts = parts
        self._literal = "".join(text for text, _ in parts) if not names else None
        self._around_topic: tuple[str, str] | None = None
        if names == ["topic"]:
            at = next(index for index, (_, name) in enumerate(parts) if name is not None)
            self._around_topic = (
                "".join(text for text, _ in parts[: at + 1]),
                "".join(text for text, _ in parts[at + 1 :]),
            )

    def render(self, event: Event, *, gateway: str, rule_id: str | None = None) -> str:
        """The topic of ``event``'s row (``gateway`` and ``rule_id`` fill their fields)."""
        if self._literal is not None:
            return self._literal
        if self._around_topic is not None:
            before, after = self._around_topic
            return f"{before}{event.topic}{after}"
        values = template_values(event, gateway=gateway, rule_id=rule_id)
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
