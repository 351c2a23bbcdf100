"""Rule ``publish`` actions on an MQTT session of their own: handed off, pipelined, confirmed.

``publish`` queues a message and returns at once (it waits only while ``max_queued``
messages are already waiting), so the pipeline never stalls on the broker. Every message
queued in one event-loop turn is written in one socket write, QoS 1 ones as far as the
broker's Receive Maximum allows; each PUBACK frees a slot and the next queued messages go
out in the same turn. A message's ``confirm`` runs once the broker has it: its PUBACK for
QoS 1, the hand-off to the socket for QoS 0. The pipeline acknowledges the event that
caused a publish only then, so a crash before the PUBACK means redelivery of the event and
a new publish: at least once.

The session (clean start, opened on the first publish) is never read-gated, unlike the
ingest session whose read gate holds back the PUBACKs the broker waits for. When the
connection drops, the messages in flight go back to the head of the queue and are sent
again, in their order, once gmqtt has reconnected. PUBLISH packets are encoded here
(gmqtt's own publish path writes one packet per socket write and keeps its packet ids to
itself); connecting, keepalive and reconnecting stay gmqtt's (``flux.ingest._gmqtt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from flux import faults
from flux.config import MqttConfig
from flux.errors import MqttConnectError
from flux.events import PublishMessage
from flux.ingest._gmqtt import MQTTv50, PublisherClient, connect
from flux.ingest.broker import MqttBroker
from flux.ingest.mqtt import HOPS_PROPERTY
from flux.metrics import PUBLISHES_PENDING, PUBLISHES_REFUSED
from flux.retry import Backoff

log = logging.getLogger(__name__)

#: QoS 1 messages in flight when the broker announces no Receive Maximum (MQTT 3.1.1).
DEFAULT_WINDOW = 1_024
_RECONNECT_DELAY_S = 1.0
#: PUBACK reason codes from 0x80 up are refusals (MQTT 5, 3.4.2.1).
_REFUSED = 0x80
_MID = struct.Struct("!H")


def _noop() -> None:
    """Confirm nothing: a publish nobody waits for."""


def _varint(value: int) -> bytes:
    """MQTT's variable byte integer (remaining length, property length)."""
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
    """One queued message: everything of its PUBLISH but the packet id, and its confirm."""

    qos: int
    retain: bool
    topic: bytes  # length-prefixed
    properties: bytes  # length-prefixed (MQTT 5), or empty
    payload: bytes
    confirm: Callable[[], None]

    def packet(self, mid: int) -> bytes:
        body = self.topic + (_MID.pack(mid) if self.qos else b"") + self.properties
        first = 0x30 | (self.qos << 1) | int(self.retain)
        length = len(body) + len(self.payload)
        return bytes((first,)) + _varint(length) + body + self.payload


class MqttPublisher:
    """Publish rule actions' messages; see the module docstring for the guarantees."""

    def __init__(
        self,
        *,
        config: MqttConfig,
        broker: MqttBroker,
        max_queued: int = 10_000,
        connect_timeout_s: float = 15.0,
    ) -> None:
        self._config = config
        self._client_id = f"{config.client_id}-pub"
        self._broker = broker
        self._max_queued = max_queued
        self._connect_timeout_s = connect_timeout_s
        self._client: PublisherClient | None = None
        self._connector: asyncio.Task[None] | None = None
        self._queue: deque[_Outgoing] = deque()
        self._in_flight: dict[int, _Outgoing] = {}  # by packet id, in the order sent
        self._next_mid = 0
        self._window = DEFAULT_WINDOW
        self._connected = False
        self._flush_scheduled = False
        self._room = asyncio.Event()
        self._room.set()
        self._closed = False
        self._hops_properties: dict[int, bytes] = {}
        self._refusals_logged = False
        PUBLISHES_PENDING.set_function(lambda: self.pending)

    @property
    def pending(self) -> int:
        """Messages queued or in flight (not yet confirmed)."""
        return len(self._queue) + len(self._in_flight)

    async def __aenter__(self) -> Self:
        return self  # the session opens on the first publish: most gateways never publish

    async def __aexit__(self, *exc_info: object) -> None:
        self._closed = True
        self._room.set()  # publishers waiting for room give up
        if self._connector is not None:
            self._connector.cancel()
            await asyncio.gather(self._connector, return_exceptions=True)
        if self.pending:
            log.warning(
                "%d rule publishes not confirmed by the broker at shutdown; the events that "
                "caused them stay unacknowledged and are redelivered",
                self.pending,
            )
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5)

    async def publish(self, message: PublishMessage, confirm: Callable[[], None] = _noop) -> None:
        """Queue ``message`` tagged with its hop count (MQTT 5 user property); ``confirm``
        runs once the broker has it. Waits only while ``max_queued`` messages wait.

        When the gateway is subscribed to the topic the message comes back as an event that
        keeps the count, so a loop through the broker is cut like one inside the process.
        """
        while len(self._queue) >= self._max_queued and not self._closed:
            self._room.clear()
            await self._room.wait()
        if self._closed:
            raise MqttConnectError("the publishing session is closed; not published")
        self._queue.append(
            _Outgoing(
                message.qos,
                message.retain,
                _utf8(message.topic),
                self._properties(message.hops),
                message.payload,
                confirm,
            )
        )
        if self._client is None and self._connector is None:
            self._connector = asyncio.create_task(self._connect_loop(), name="mqtt:publisher")
        self._schedule_flush()

    def _properties(self, hops: int) -> bytes:
        if self._broker.protocol_version < MQTTv50:
            return b""
        properties = self._hops_properties.get(hops)
        if properties is None:
            pair = b"\x26" + _utf8(HOPS_PROPERTY) + _utf8(str(hops))
            properties = self._hops_properties[hops] = _varint(len(pair)) + pair
        return properties

    # -- the session ---------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        """Open the session; while the broker refuses, retry with capped backoff (messages
        wait in the queue: back-pressure, not loss)."""
        backoff = Backoff(first_s=_RECONNECT_DELAY_S / 4, max_s=self._config.reconnect_max_delay_s)
        while self._client is None and not self._closed:
            client = PublisherClient(
                self._client_id,
                clean_session=True,
                on_puback=self._on_puback,
                on_session=self._on_session,
            )
            client.reconnect_delay = _RECONNECT_DELAY_S  # gmqtt retries forever; 6 s by default
            self._client = client  # its CONNACK calls _on_session before connect returns
            try:
                await connect(
                    client,
                    self._config,
                    version=self._broker.protocol_version,
                    timeout_s=self._connect_timeout_s,
                    what="the publishing session to",
                )
            except MqttConnectError as exc:
                self._client = None
                self._connected = False
                delay = backoff.next()
                log.warning("%s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        self._connector = None

    def _on_session(self, connected: bool) -> None:
        """(Re)connected: read the window and send; lost: what was in flight goes back to
        the head of the queue, in order, for the next connection."""
        if connected == self._connected:
            return
        self._connected = connected
        if connected and self._client is not None:
            self._window = self._client.receive_maximum() or DEFAULT_WINDOW
            self._schedule_flush()
        elif self._in_flight:
            log.warning(
                "publishing session lost; %d unconfirmed publishes are sent again on reconnect",
                len(self._in_flight),
            )
            self._queue.extendleft(reversed(list(self._in_flight.values())))
            self._in_flight.clear()

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
        packets: list[bytes] = []
        while queue and (queue[0].qos == 0 or len(in_flight) < self._window):
            message = queue.popleft()
            taken.append(message)
            mid = 0
            if message.qos:
                mid = self._new_mid()
                in_flight[mid] = message
            packets.append(message.packet(mid))
        if not packets:
            return
        if not client.send(b"".join(packets)):
            # The connection is gone: what was in flight, then what this turn took, back to
            # the head of the queue for the reconnect.
            self._connected = False
            fresh = {id(message) for message in taken}
            earlier = [m for m in in_flight.values() if id(m) not in fresh]
            in_flight.clear()
            queue.extendleft(reversed(earlier + taken))
            return
        faults.hit("publish_written")
        for message in taken:
            if not message.qos:
                message.confirm()
        if len(queue) < self._max_queued and not self._room.is_set():
            self._room.set()

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
            PUBLISHES_REFUSED.labels(reason=f"0x{reason:02x}").inc()
            if not self._refusals_logged:
                self._refusals_logged = True
                log.error(
                    "the broker refused a rule publish (PUBACK reason 0x%02x); counted in "
                    "flux_mqtt_publishes_refused_total, not retried",
                    reason,
                )
        message.confirm()
        if self._queue:
            self._schedule_flush()


__all__ = ["DEFAULT_WINDOW", "MqttPublisher"]
