"""What the store needs of the sinks, as a Protocol (the store never imports ``flux.sinks``'
runtime): the outbox rows an event batch carries, a hook once they are committed, and a
wait while a blocking sink's backlog is full."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from flux.events import Event
from flux.sinks.rows import OutboxRow
from flux.store.database import json_text


def outbox_params(
    rows: Sequence[OutboxRow], stamp: Callable[[float], Any]
) -> list[tuple[Any, ...]]:
    """``rows`` as the drivers' ``outbox`` insert parameters, in the table's column order
    (``stamp`` turns a time into the driver's timestamp); cf. ``outbox_values``."""
    return [
        (
            row.id,
            row.sink,
            row.device_id,
            row.event_id,
            row.rule_id,
            row.topic,
            row.payload,
            None if row.headers is None else json_text(row.headers),
            row.timeout_s,
            row.qos,
            row.retain,
            row.hops,
            created := stamp(row.created_at),
            created,
        )
        for row in rows
    ]


class OutboxHooks(Protocol):
    def route(self, batch: Sequence[Event]) -> list[OutboxRow]:
        """The outbox rows of the sinks ``batch``'s events are routed to by topic."""
        ...

    def committed(self, rows: Sequence[OutboxRow]) -> None:
        """``rows`` are committed: their sinks may send them."""
        ...

    async def wait_for_room(self) -> None:
        """Return once no sink with the ``block`` policy has a full backlog."""
        ...


class _NoSinks:
    """The hooks of a gateway without sinks (and of tests that write batches directly)."""

    def route(self, batch: Sequence[Event]) -> list[OutboxRow]:
        return []

    def committed(self, rows: Sequence[OutboxRow]) -> None:
        return None

    async def wait_for_room(self) -> None:
        return None


NO_SINKS: OutboxHooks = _NoSinks()


def outbox_values(row: OutboxRow) -> dict[str, Any]:
    """``row`` as the values of an ``outbox`` insert through SQLAlchemy."""
    return {
        "id": row.id,
        "sink": row.sink,
        "device_id": row.device_id,
        "event_id": row.event_id,
        "rule_id": row.rule_id,
        "topic": row.topic,
        "payload": row.payload,
        "headers": row.headers,
        "timeout_s": row.timeout_s,
        "qos": row.qos,
        "retain": row.retain,
        "hops": row.hops,
        "next_attempt_at": datetime.fromtimestamp(row.created_at, UTC),
        "created_at": datetime.fromtimestamp(row.created_at, UTC),
    }


__all__ = ["NO_SINKS", "OutboxHooks", "outbox_params", "outbox_values"]
