"""Rule ``publish`` actions on an MQTT session of their own, with flow control.

On the ingest session a burst of QoS 1 publishes larger than the broker's Receive Maximum
(Mosquitto: 20), as when a backlog replays, made gmqtt refuse them, and waiting there would
deadlock: the ingest read gate holds back the PUBACKs that free the window while the
pipeline waits. This session (opened on the first publish) is never read-gated, and a QoS 1
publish waits for room in the broker's window instead of failing; while the broker is away,
publishes wait (back-pressure reaches the pipeline) and gmqtt resends what was in flight
when it reconnects.

A message handed to this session is not yet confirmed by the broker when ``publish``
returns: a crash in that window loses it (at most the broker's Receive Maximum of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Self

import gmqtt

from flux.config import MqttConfig
from flux.ingest.mqtt import HOPS_PROPERTY, MqttConnectError, connect

log = logging.getLogger(__name__)

#: Receive Maximum when the broker announces none (MQTT 3.1.1, or omitted: 65,535).
_DEFAULT_WINDOW = 65_535
_RECONNECT_DELAY_S = 1.0


class _PublisherClient(gmqtt.Client):  # type: ignore[misc]
    """gmqtt client that reports each PUBACK of one of its publishes to ``acked``."""

    def __init__(self, *args: Any, acked: Callable[[], None], **kwargs: Any) -> None:
        self._acked = acked
        super().__init__(*args, **kwargs)

    def _remove_message_from_queue(self, mid: int) -> None:
        super()._remove_message_from_queue(mid)
        self._acked()


class MqttPublisher:
    """Publish rule actions' messages; QoS 1 ones wait for room in the broker's window."""

    def __init__(
        self,
        *,
        config: MqttConfig,
        client_id: str,
        protocol_version: int,
        connect_timeout_s: float = 15.0,
    ) -> None:
        self._config = config
        self._client_id = client_id
        self._protocol_version = protocol_version
        self._connect_timeout_s = connect_timeout_s
        self._client: _PublisherClient | None = None
        self._in_flight = 0
        self._room = asyncio.Event()
        self._connecting = asyncio.Lock()
        self._closed = False

    async def __aenter__(self) -> Self:
        return self  # the session opens on the first publish: most gateways never publish

    async def _connected(self) -> _PublisherClient:
        """The session, opened now if need be; while the broker refuses, retry with capped
        backoff (the pipeline waits: back-pressure, not a lost message)."""
        async with self._connecting:
            delay = _RECONNECT_DELAY_S / 4
            while self._client is None:
                if self._closed:
                    raise MqttConnectError("the publishing session is closed; not published")
                try:
                    self._client = await self._connect()
                except MqttConnectError as exc:
                    log.warning("%s; retrying in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._config.reconnect_max_delay_s)
            return self._client

    async def _connect(self) -> _PublisherClient:
        client = _PublisherClient(self._client_id, clean_session=True, acked=self._acked)
        client.reconnect_delay = _RECONNECT_DELAY_S  # gmqtt retries forever; 6 s apart by default
        await connect(
            client,
            self._config,
            version=self._protocol_version,
            timeout_s=self._connect_timeout_s,
            what="the publishing session to",
        )
        return client

    async def __aexit__(self, *exc_info: object) -> None:
        self._closed = True
        self._room.set()  # publishers waiting for room give up
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int, retain: bool, hops: int
    ) -> None:
        """Send a message tagged with its hop count (MQTT 5 user property); QoS 1 waits for
        room in the broker's window (each PUBACK makes room).

        When the gateway is subscribed to the topic the message comes back as an event that
        keeps the count, so a loop through the broker is cut like one inside the process.
        """
        client = await self._connected()
        if qos > 0:
            while self._in_flight >= self._window():
                if self._closed:
                    raise MqttConnectError("the publishing session is closed; not published")
                self._room.clear()
                await self._room.wait()
            self._in_flight += 1
        try:
            client.publish(
                topic, payload, qos=qos, retain=retain, user_property=[(HOPS_PROPERTY, str(hops))]
            )
        except Exception:
            if qos > 0:
                self._acked()
            raise

    def _window(self) -> int:
        """QoS 1 messages that may be in flight: one less than the broker's Receive Maximum
        (gmqtt refuses a new packet id once that many are in use)."""
        client = self._client
        announced: Any = None
        if client is not None:
            announced = client._package_handler._connack_properties.get("receive_maximum")
        if isinstance(announced, list):
            announced = announced[0] if announced else None
        return max(1, (announced or _DEFAULT_WINDOW) - 1)

    def _acked(self) -> None:
        self._in_flight = max(0, self._in_flight - 1)
        self._room.set()


__all__ = ["MqttPublisher"]
