"""MQTT ingest over gmqtt: persistent session, acknowledgement only after commit.

Each PUBLISH is handled synchronously in gmqtt's read loop (no task per message): the event
goes straight onto the bus when every queue has room, else it joins a FIFO that one task
hands over as room appears (later messages queue behind it, so order holds). A QoS 1 event
carries an acknowledgement hook; the store calls it after commit, and the PUBACKs of one
loop iteration leave in one socket write. The broker's Receive Maximum bounds how many
unacknowledged messages are in flight; for QoS 0, which it does not bound, reading from the
socket pauses while too many messages wait for the bus. The same pause guards QoS 1 against
a broker that overruns Receive Maximum (Mosquitto 2.0 does when it replays a session's
offline queue).

A PUBACK for a message that arrived on a connection since lost is withheld: after a reconnect
a packet id may name a different message, and the broker redelivers the old one anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Self

from flux.config import MqttConfig
from flux.errors import MqttConnectError, MqttUnreachable
from flux.events import DeadLetter, Event, make_event
from flux.ingest._gmqtt import IngestClient, connect
from flux.ingest.broker import MqttBroker
from flux.metrics import DEGRADED, MQTT_CONNECTED, MQTT_MESSAGES, MQTT_RECONNECTS, MQTT_STALE_ACKS
from flux.retry import Backoff
from flux.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_RECONNECT_FIRST_DELAY_S = 0.2
#: How long a clean stop waits for the broker to confirm it read our last packets.
_BARRIER_TIMEOUT_S = 2.0
#: MQTT 5 user property carrying a derived message's hop count.
HOPS_PROPERTY = "flux-hops"
#: PUBACK (QoS 1) and PUBREC (QoS 2) with reason "success": valid in MQTT 3.1.1 and 5.
_ACK_COMMAND = {1: 0x40, 2: 0x50}
_ACK_PACKET = struct.Struct("!BBH")


def _log_only(error: MqttConnectError) -> None:
    """The default ``on_fatal``: the error is logged already; nothing more to do."""


def _hops_from(properties: dict[str, Any]) -> int:
    """Read our hop-count user property, if a rule action of some gateway published this."""
    for pair in properties.get("user_property") or ():
        if isinstance(pair, tuple | list) and len(pair) == 2 and pair[0] == HOPS_PROPERTY:
            try:
                return max(0, min(int(pair[1]), 1_000))
            except (TypeError, ValueError):
                return 0
    return 0


class MqttIngest:
    """Subscribe to the configured topics and hand every message to ``deliver``/``dead_letter``."""

    def __init__(
        self,
        *,
        config: MqttConfig,
        deliver: Callable[[Event], Awaitable[None]],
        try_deliver: Callable[[Event], bool] | None = None,
        dead_letter: Callable[[DeadLetter], Awaitable[None]],
        receive_maximum: int,
        max_pending: int = 1024,
        broker: MqttBroker,
        connect_timeout_s: float = 15.0,
        binary_topic: Callable[[str], bool] | None = None,
        on_fatal: Callable[[MqttConnectError], None] = _log_only,
    ) -> None:
        self._config = config
        self._deliver = deliver
        self._try_deliver = try_deliver
        self._dead_letter = dead_letter
        self._receive_maximum = max(1, min(receive_maximum, 65535))
        self._max_pending = max(max_pending, self._receive_maximum)
        self._broker = broker
        self._binary_topic = binary_topic
        self._on_fatal = on_fatal
        self._connector: asyncio.Task[None] | None = None
        self._messages_by_qos = [MQTT_MESSAGES.labels(qos=str(qos)) for qos in range(3)]
        self._connect_timeout_s = connect_timeout_s
        self._pending = 0
        # Set while fewer than max_pending messages are in flight; gmqtt's read loop waits on
        # it, so its stream buffer fills and the transport stops reading (TCP back-pressure).
        self._room = asyncio.Event()
        self._room.set()
        self._generation = 0
        self._connected = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._client: IngestClient | None = None
        self._backoff = Backoff(
            first_s=_RECONNECT_FIRST_DELAY_S, max_s=config.reconnect_max_delay_s
        )
        self._accepting = True
        # Messages waiting for room on the bus, oldest first, and the task handing them
        # over; while any wait, later messages queue behind them so none overtakes another.
        self._waiting: deque[tuple[Event | DeadLetter, bool]] = deque()
        self._hand_over_task: asyncio.Task[None] | None = None
        # PUBACK/PUBREC packets due on the current connection, written once per loop turn.
        self._acks: list[bytes] = []
        self._acks_generation = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def pending(self) -> int:
        """Messages received and not yet acknowledged or handed over."""
        return self._pending

    def subscriptions(self) -> list[str]:
        """Return the topic filters to subscribe, with the shared-subscription prefix if any."""
        group = self._config.shared_group
        return [f"$share/{group}/{topic}" if group else topic for topic in self._config.topics]

    async def __aenter__(self) -> Self:
        if self._client is not None or self._connector is not None:
            raise RuntimeError("the MQTT ingest is already running")
        self._set_connected(False)  # until the broker's CONNACK says otherwise
        try:
            await self._connect()
        except MqttUnreachable as exc:
            log.warning(
                "%s; running without MQTT ingest until the broker answers (retrying up to "
                "every %gs)",
                exc,
                self._config.reconnect_max_delay_s,
            )
            self._connector = asyncio.create_task(self._connect_until_up(), name="mqtt:connect")
        return self

    async def _connect(self) -> None:
        """Open the persistent session once; ``MqttUnreachable`` or ``MqttConnectError``."""
        config = self._config
        client = IngestClient(
            config.client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            session_expiry_interval=config.session_expiry_s,
            receive_maximum=self._receive_maximum,
            receive=self._receive,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_qos0_message
        client.reconnect_delay = _RECONNECT_FIRST_DELAY_S
        self._client = client
        try:
            await connect(
                client,
                config,
                version=self._broker.protocol_version,
                timeout_s=self._connect_timeout_s,
                what="to the MQTT broker at",
            )
        except MqttConnectError:
            self._client = None
            raise

    async def _connect_until_up(self) -> None:
        """Retry the first connection with capped backoff until the broker answers; a refusal
        that will not fix itself (credentials, TLS) goes to ``on_fatal``."""
        try:
            while True:
                await asyncio.sleep(self._backoff.next())
                try:
                    await self._connect()
                    return
                except MqttUnreachable as exc:
                    log.debug("%s; retrying", exc)
                except MqttConnectError as exc:
                    log.error("%s", exc)
                    self._on_fatal(exc)
                    return
        finally:
            self._connector = None

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def stop_intake(self) -> None:
        """Stop passing new messages on; they stay unacknowledged and are redelivered later."""
        self._accepting = False

    async def stop(self) -> None:
        await cancel_and_wait(self._connector)
        client, self._client = self._client, None
        if client is None:
            return
        self._accepting = False
        self._generation += 1  # acks still pending now would belong to a dead connection
        await self._broker_has_read(client, timeout=_BARRIER_TIMEOUT_S)
        try:
            await asyncio.wait_for(
                client.disconnect(session_expiry_interval=self._config.session_expiry_s), 5
            )
        except (TimeoutError, OSError, Exception) as exc:
            log.warning("MQTT disconnect did not complete cleanly: %s", exc)
        self._set_connected(False)

    async def _broker_has_read(self, client: IngestClient, *, timeout: float) -> None:
        """Wait until the broker has read everything sent so far: it answers a PINGREQ only
        after the packets before it, our last PUBACKs included.

        Closing a socket that still holds unread PUBLISHes sends a TCP reset, and a reset
        makes the broker's kernel drop what the broker had not read yet: PUBACKs sent just
        before the close were lost that way and their messages came back as duplicates.
        """
        if not client.is_connected:
            return
        try:
            await client.ping(timeout)
        except (TimeoutError, OSError, Exception) as exc:
            log.warning(
                "the broker did not answer before disconnect (%s); recent PUBACKs "
                "may be redelivered as duplicates",
                exc or type(exc).__name__,
            )

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no message is between arrival and acknowledgement; False on timeout."""
        if self._pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        # Let the PUBACK callbacks of the last completed handlers run before anyone closes.
        for _ in range(3):
            await asyncio.sleep(0)
        return self._pending == 0

    # -- gmqtt callbacks (on the event loop) ----------------------------------------------

    def _on_connect(self, client: Any, flags: int, rc: int, properties: Any) -> None:
        self._generation += 1
        self._backoff.reset()
        client.reconnect_delay = _RECONNECT_FIRST_DELAY_S
        qos = self._config.qos
        for topic in self.subscriptions():
            client.subscribe(topic, qos=qos)
        client.gate_reads(self._room)
        self._set_connected(True)
        log.info(
            "connected to MQTT broker %s:%d, subscribed %s",
            self._config.host,
            self._config.port,
            self.subscriptions(),
        )

    def _on_disconnect(self, client: Any, packet: Any, exc: Any = None) -> None:
        self._generation += 1
        if self._client is not None:
            MQTT_RECONNECTS.inc()
            client.reconnect_delay = delay = self._backoff.next()  # gmqtt's next attempts
            log.warning("MQTT connection lost; reconnecting (next delay %.1fs)", delay)
        self._set_connected(False)
        self._room.set()

    def _on_qos0_message(
        self, client: Any, topic: str | bytes, payload: bytes, qos: int, properties: Any
    ) -> None:
        self._receive(topic, payload, qos, properties, None)

    def _receive(
        self,
        topic: str | bytes,
        payload: bytes,
        qos: int,
        properties: dict[str, Any],
        mid: int | None,
    ) -> None:
        """Turn one PUBLISH into an event (or dead letter) and hand it over without a task
        when the bus has room. A QoS > 0 message is acknowledged by the store, after commit."""
        if not self._accepting:
            return  # unacknowledged: the broker redelivers it to the next session
        self._messages_by_qos[min(qos, 2)].inc()
        if isinstance(topic, bytes):
            topic = topic.decode("utf-8", "replace")
        item = make_event(
            topic,
            payload,
            max_bytes=self._config.max_payload_bytes,
            source="mqtt",
            qos=qos,
            binary=self._binary_topic is not None and self._binary_topic(topic),
        )
        if isinstance(item, Event) and properties:
            item.hops = _hops_from(properties)
        if mid is not None:
            item.ack = partial(self._acknowledge, self._generation, mid, _ACK_COMMAND[qos])
        self._pending += 1
        self._idle.clear()
        if self._pending > self._max_pending:
            self._room.clear()
        if not self._waiting and isinstance(item, Event) and self._try_deliver is not None:
            try:
                handed_over = self._try_deliver(item)
            except Exception:
                log.exception("message on %s could not be handed over; redelivery follows", topic)
                self._settle()
                return
            if handed_over:
                if mid is None:
                    self._settle()
                return
        self._waiting.append((item, mid is not None))
        if self._hand_over_task is None:
            self._hand_over_task = asyncio.get_running_loop().create_task(
                self._hand_over(), name="mqtt:hand-over"
            )

    async def _hand_over(self) -> None:
        """Hand the waiting messages over in order, each as soon as the bus has room (a
        dead letter to the store); the slow path of ``_receive``."""
        waiting = self._waiting
        try:
            while waiting:
                item, acknowledged = waiting[0]
                try:
                    if not isinstance(item, Event):
                        await self._dead_letter(item)
                    elif self._try_deliver is None or not self._try_deliver(item):
                        await self._deliver(item)
                except Exception:
                    log.exception(
                        "message on %s could not be handed over; it will be redelivered",
                        item.topic,
                    )
                    acknowledged = False
                waiting.popleft()
                if not acknowledged:
                    self._settle()
        finally:
            self._hand_over_task = None

    def _acknowledge(self, generation: int, mid: int, command: int) -> None:
        """The store committed the message: queue its PUBACK (withheld if the connection
        it came on is gone) and flush the queue once this loop iteration is over."""
        self._settle()
        if generation != self._generation:
            MQTT_STALE_ACKS.inc()
            return
        if self._acks_generation != generation:
            self._acks, self._acks_generation = [], generation
        if not self._acks:
            asyncio.get_running_loop().call_soon(self._flush_acks)
        self._acks.append(_ACK_PACKET.pack(command, 2, mid))

    def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        if not acks:
            return
        client = self._client
        current = self._acks_generation == self._generation
        if not current or client is None or not client.write(b"".join(acks)):
            MQTT_STALE_ACKS.inc(len(acks))

    def _settle(self) -> None:
        """One message fewer between arrival and acknowledgement (or hand-over, QoS 0)."""
        self._pending -= 1
        if not self._pending:
            self._idle.set()
        if not self._room.is_set() and self._pending <= self._max_pending // 2:
            self._room.set()

    # -- helpers --------------------------------------------------------------------------

    def _set_connected(self, connected: bool) -> None:
        if connected:
            self._connected.set()
        else:
            self._connected.clear()
        MQTT_CONNECTED.set(1 if connected else 0)
        DEGRADED.labels(reason="mqtt_disconnected").set(0 if connected else 1)


__all__ = ["HOPS_PROPERTY", "MqttIngest"]
