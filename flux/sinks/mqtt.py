"""MQTT sinks: an MQTT session of their own per sink, pipelined, confirmed by PUBACK.

``MqttSession.enqueue`` queues messages and returns at once (the sink bounds how many it
hands over). Every message queued in one event-loop turn is written in one socket write,
QoS 1 ones as far as the broker's Receive Maximum allows; each PUBACK frees a slot and the
next queued messages go out in the same turn. A message's ``confirm`` runs once the broker
has it: its PUBACK for QoS 1, the hand-off to the socket for QoS 0. When the connection
drops, the messages in flight go back to the head of the queue and are sent again, in their
order, once gmqtt has reconnected. PUBLISH packets are encoded here (gmqtt's own publish
path writes one packet per socket write and keeps its packet ids to itself); connecting,
keepalive and reconnecting stay gmqtt's (``flux.ingest._gmqtt``).

``MqttTransport`` is what an ``OrderedSink`` sends its rows through: the built-in ``local``
sink (rule ``publish`` actions to the gateway's own broker, on the session
``<client_id>-pub``, never read-gated unlike the ingest session) and every ``type = "mqtt"``
sink (an upstream broker, on a persistent session).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Self

from flux import faults
from flux.config import MqttConfig
from flux.errors import MqttConnectError
from flux.ingest._gmqtt import MQTTv50, PublisherClient, connect
from flux.ingest.mqtt import HOPS_PROPERTY
from flux.retry import Backoff
from flux.sinks.metrics import SINK_CONNECTED, SINK_FAILURES
from flux.sinks.rows import OutboxRow
from flux.sinks.sender import Confirm
from flux.tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: MQTT 5 user property carrying the event id a forwarded message comes from (a receiver
#: deduplicates on it).
EVENT_ID_PROPERTY = "flux-event-id"
#: QoS 1 messages in flight when the broker announces no Receive Maximum (MQTT 3.1.1).
DEFAULT_WINDOW = 1_024
_RECONNECT_DELAY_S = 1.0
#: PUBACK reason codes from 0x80 up are refusals (MQTT 5, 3.4.2.1).
_REFUSED = 0x80
_MID = struct.Struct("!H")


def _noop() -> None:
    """Confirm nothing: a publish nobody waits for."""


#: The variable byte integers below 128: one byte each (a short topic's property length).
_ONE_BYTE = [bytes((value,)) for value in range(128)]


def _varint(value: int) -> bytes:
    """MQTT's variable byte integer (remaining length, property length)."""
    if value < 128:
        return _ONE_BYTE[value]
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _utf8(text: str) -> bytes:
    data = text.encode()
    return _MID.pack(len(data)) + data


@dataclass(slots=True)
class _Outgoing:
    """One queued message: its PUBLISH encoded but for the packet id, and its confirm."""

    qos: int
    head: bytes  # fixed header and topic; a QoS 1 packet id goes after it
    tail: bytes  # properties (MQTT 5) and payload
    confirm: Callable[[], None]

    @classmethod
    def publish(
        cls,
        *,
        qos: int,
        retain: bool,
        topic: bytes,
        properties: bytes,
        payload: bytes,
        confirm: Callable[[], None],
    ) -> _Outgoing:
        """``topic`` and ``properties`` come length-prefixed (properties: empty before
        MQTT 5)."""
        length = len(topic) + (2 if qos else 0) + len(properties) + len(payload)
        head = bytes((0x30 | (qos << 1) | int(retain),)) + _varint(length) + topic
        return cls(qos, head, properties + payload, confirm)

    def packet(self, mid: int) -> bytes:
        return (
            b"".join((self.head, _MID.pack(mid), self.tail)) if self.qos else self.head + self.tail
        )


class MqttSession:
    """One sink's MQTT session; see the module docstring for the guarantees."""

    def __init__(
        self,
        *,
        name: str,
        config: MqttConfig,
        client_id: str,
        protocol: Callable[[], int],
        persistent: bool,
        connect_timeout_s: float = 15.0,
    ) -> None:
        self.name = name
        self._config = config
        self._client_id = client_id
        self._protocol = protocol
        self._persistent = persistent
        self._connected_gauge = SINK_CONNECTED.labels(sink=name)
        self._connect_timeout_s = connect_timeout_s
        self._client: PublisherClient | None = None
        self._connector: asyncio.Task[None] | None = None
        self._queue: deque[_Outgoing] = deque()
        self._in_flight: dict[int, _Outgoing] = {}  # by packet id, in the order sent
        self._next_mid = 0
        self._window = DEFAULT_WINDOW
        self._connected = False
        self._flush_scheduled = False
        self._closed = False
        self._hops_properties: dict[int, bytes] = {}
        self._refusals_logged = False
        self.last_error = ""
        #: Called when the session connects or loses its connection (the sink sends again).
        self.on_change: Callable[[], None] = _noop

    @property
    def pending(self) -> int:
        """Messages queued or in flight (not yet confirmed)."""
        return len(self._queue) + len(self._in_flight)

    @property
    def window(self) -> int:
        """QoS 1 messages the broker lets us have unconfirmed (its Receive Maximum)."""
        return self._window

    @property
    def connected(self) -> bool:
        return self._connected

    async def __aenter__(self) -> Self:
        self._connected_gauge.set(0)
        self._connect()
        return self

    def _connect(self) -> None:
        """Open the session in the background (retrying until the broker answers)."""
        if self._client is None and self._connector is None and not self._closed:
            self._connector = asyncio.create_task(
                self._connect_loop(), name=f"sink:{self.name}:connect"
            )

    async def __aexit__(self, *exc_info: object) -> None:
        self._closed = True
        await cancel_and_wait(self._connector)
        if self.pending:
            log.warning(
                "sink %s: %d messages not confirmed by the broker at shutdown; they stay in "
                "the outbox and are sent again",
                self.name,
                self.pending,
            )
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5)

    def enqueue(self, messages: list[_Outgoing]) -> None:
        """Queue ``messages`` for the next socket write; each one's ``confirm`` runs once the
        broker has it (its PUBACK; QoS 0: once written)."""
        if self._closed:
            raise MqttConnectError(f"sink {self.name}: the session is closed; not published")
        self._queue.extend(messages)
        self._connect()
        self._schedule_flush()

    def properties(self, hops: int, event_id: str | None) -> bytes:
        """The MQTT 5 user properties: the hop count, and the event id when there is one.
        This runs once per message, so the fixed parts are encoded once."""
        if self._protocol() < MQTTv50:
            return b""
        hops_pair = self._hops_properties.get(hops)
        if hops_pair is None:
            hops_pair = self._hops_properties[hops] = _user_property(HOPS_PROPERTY, str(hops))
        if event_id is None:
            return _varint(len(hops_pair)) + hops_pair
        pairs = b"".join((hops_pair, _EVENT_ID_KEY, _utf8(event_id)))
        return _varint(len(pairs)) + pairs

    # -- the session ---------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        """Open the session; while the broker refuses, retry with capped backoff (messages
        wait in the queue: back-pressure, not loss)."""
        backoff = Backoff(first_s=_RECONNECT_DELAY_S / 4, max_s=self._config.reconnect_max_delay_s)
        while self._client is None and not self._closed:
            client = PublisherClient(
                self._client_id,
                clean_session=not self._persistent,
                session_expiry_interval=self._config.session_expiry_s if self._persistent else 0,
                on_puback=self._on_puback,
                on_session=self._on_session,
            )
            client.reconnect_delay = _RECONNECT_DELAY_S  # gmqtt retries forever; 6 s by default
            self._client = client  # its CONNACK calls _on_session before connect returns
            try:
                await connect(
                    client,
                    self._config,
                    version=self._protocol(),
                    timeout_s=self._connect_timeout_s,
                    what=f"sink {self.name} to",
                )
            except MqttConnectError as exc:
                self._client = None
                self._connected = False
                self.last_error = str(exc)
                SINK_FAILURES.labels(sink=self.name, reason="connect").inc()
                delay = backoff.next()
                log.warning("%s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        self._connector = None

    def _on_session(self, connected: bool) -> None:
        """(Re)connected: read the window and send; lost: what was in flight goes back to
        the head of the queue, in order, for the next connection, and the loss is counted
        (``flux_sink_failures_total{reason="disconnected"}``) unless we are closing it."""
        if connected == self._connected:
            return
        self._connected = connected
        self._connected_gauge.set(1 if connected else 0)
        self.last_error = "" if connected else "the connection to the broker was lost"
        self.on_change()
        if connected and self._client is not None:
            self._window = self._client.receive_maximum() or DEFAULT_WINDOW
            self._schedule_flush()
            return
        unconfirmed = len(self._in_flight)
        self._queue.extendleft(reversed(list(self._in_flight.values())))
        self._in_flight.clear()
        if not self._closed:
            SINK_FAILURES.labels(sink=self.name, reason="disconnected").inc()
            log.warning(
                "sink %s: lost its connection to the broker; reconnecting (%d unconfirmed "
                "messages are sent again)",
                self.name,
                unconfirmed,
            )

    # -- sending ---------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Write every queued message the window has room for, in one socket write."""
        self._flush_scheduled = False
        client = self._client
        if client is None or not self._connected:
            return
        queue, in_flight = self._queue, self._in_flight
        taken: list[_Outgoing] = []
        mids: list[int] = []  # the packet ids this turn gave out
        packets: list[bytes] = []
        while queue and (queue[0].qos == 0 or len(in_flight) < self._window):
            message = queue.popleft()
            taken.append(message)
            mid = 0
            if message.qos:
                mid = self._new_mid()
                in_flight[mid] = message
                mids.append(mid)
            packets.append(message.packet(mid))
        if not packets:
            return
        if not client.send(b"".join(packets)):
            # The connection is gone: what this turn took back to the head of the queue,
            # then the loss as gmqtt will report it (what was in flight goes before them).
            for mid in mids:
                del in_flight[mid]
            queue.extendleft(reversed(taken))
            self._on_session(False)
            return
        faults.hit("publish_written")
        for message in taken:
            if not message.qos:
                message.confirm()

    def _new_mid(self) -> int:
        """The next packet id not in flight (1..65535)."""
        mid = self._next_mid
        while True:
            mid = mid % 65_535 + 1
            if mid not in self._in_flight:
                self._next_mid = mid
                return mid

    def _on_puback(self, mid: int, reason: int) -> None:
        message = self._in_flight.pop(mid, None)
        if message is None:
            return  # a PUBACK for a packet of an earlier connection
        if reason >= _REFUSED:
            SINK_FAILURES.labels(sink=self.name, reason=f"refused_0x{reason:02x}").inc()
            self.last_error = f"the broker refused a message (PUBACK reason 0x{reason:02x})"
            if not self._refusals_logged:
                self._refusals_logged = True
                log.error(
                    "sink %s: %s; counted in flux_sink_failures_total, not retried",
                    self.name,
                    self.last_error,
                )
        message.confirm()
        if self._queue:
            self._schedule_flush()


def _user_property(key: str, value: str) -> bytes:
    return _user_property_key(key) + _utf8(value)


def _user_property_key(key: str) -> bytes:
    return b"\x26" + _utf8(key)


_EVENT_ID_KEY = _user_property_key(EVENT_ID_PROPERTY)


class MqttTransport:
    """Send an ``OrderedSink``'s rows as PUBLISHes of one ``MqttSession``."""

    def __init__(self, session: MqttSession, *, window: int, with_event_id: bool) -> None:
        self.session = session
        self._window = window
        self._with_event_id = with_event_id
        self._confirm: Confirm | None = None
        self._confirmed_rows: list[OutboxRow] = []

    @property
    def window(self) -> int:
        """Rows the sink may hand over: none while the session is down (they stay the
        sink's, so ``drop_oldest`` may still drop them), else as many as are pipelined."""
        return self._window if self.session.connected else 0

    def on_change(self, callback: Callable[[], None]) -> None:
        self.session.on_change = callback

    @property
    def connected(self) -> bool:
        return self.session.connected

    @property
    def last_error(self) -> str:
        return self.session.last_error

    async def __aenter__(self) -> Self:
        await self.session.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.session.__aexit__(None, None, None)

    async def send(self, rows: list[OutboxRow], confirm: Confirm) -> None:
        """Queue every row as a PUBLISH; each is confirmed on its PUBACK (QoS 0: once
        written), the confirmations of one event-loop turn together. The session resends
        what a lost connection left unconfirmed.

        The hop count rides along (MQTT 5 user property ``flux-hops``): a message that
        comes back to the gateway as an event keeps it, so a loop through the broker is cut
        like one inside the process.
        """
        self._confirm = confirm
        session, with_id, confirmed = self.session, self._with_event_id, self._confirmed
        session.enqueue(
            [
                _Outgoing.publish(
                    qos=row.qos,
                    retain=row.retain,
                    topic=_utf8(row.topic),
                    properties=session.properties(row.hops, row.event_id if with_id else None),
                    payload=row.payload,
                    confirm=partial(confirmed, row),
                )
                for row in rows
            ]
        )

    def _confirmed(self, row: OutboxRow) -> None:
        if not self._confirmed_rows:
            asyncio.get_running_loop().call_soon(self._flush_confirmed)
        self._confirmed_rows.append(row)

    def _flush_confirmed(self) -> None:
        rows, self._confirmed_rows = self._confirmed_rows, []
        if rows and self._confirm is not None:
            self._confirm(rows)


__all__ = ["DEFAULT_WINDOW", "EVENT_ID_PROPERTY", "MqttSession", "MqttTransport"]
