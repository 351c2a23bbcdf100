"""gmqtt's private parts, touched here and nowhere else; its connection errors become ours.

The gateway needs what gmqtt's public API does not give: every PUBLISH handed over as it is
parsed, without gmqtt's task per message and with the PUBACK sent later, after commit
(``IngestClient``); reads paused while too many messages wait (back-pressure); raw writes,
so the PUBACKs and PUBLISHes of one event-loop turn leave in one socket write; the
publishing session's PUBACKs as they arrive, and the broker's Receive Maximum
(``PublisherClient``); and a PINGREQ whose answer tells that the broker has read everything
before it. Connecting, keepalive and reconnecting stay gmqtt's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import Callable
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTCommands, MQTTv50, MQTTv311
from gmqtt.mqtt.handler import MQTTConnectError

from flux.config import MqttConfig
from flux.errors import MqttConnectError, MqttUnreachable

#: Called per PUBLISH: topic, payload, QoS, properties, packet id (None for QoS 0).
Receiver = Callable[[str | bytes, bytes, int, dict[str, Any], int | None], None]

_MID = struct.Struct("!H")


def _protocol(client: gmqtt.Client) -> Any:
    """The client's current connection protocol (gmqtt's), or None between connections."""
    return getattr(getattr(client, "_connection", None), "_protocol", None)


class IngestClient(gmqtt.Client):  # type: ignore[misc]
    """gmqtt client whose PUBLISHes go to ``receive`` with their packet id, unacknowledged.

    gmqtt's own path runs a task per message and sends the PUBACK when it ends; the gateway
    sends it when the store has committed. gmqtt parses packets in a separate handler
    object, so its entry points are replaced on that instance.
    """

    def __init__(self, *args: Any, receive: Receiver, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        handler = self._package_handler
        self._pong = asyncio.Event()
        handle_pingresp = handler._handle_pingresp_packet

        def pingresp(cmd: int, packet: bytes) -> None:
            handle_pingresp(cmd, packet)
            self._pong.set()

        state = self._connection_state
        handle_packet = handler._handle_packet

        def handle_packet_fast(cmd: int, packet: bytes) -> None:
            # Most PUBLISHes carry no properties: parse those here (a third of gmqtt's cost
            # per message); everything else, and anything odd, takes gmqtt's full path.
            if cmd & 0xF0 != MQTTCommands.PUBLISH or not parse_publish(
                receive, cmd, packet, state.protocol_version >= MQTTv50
            ):
                handle_packet(cmd, packet)

        def qos_1(mid: int, packet: bytes, topic: str | bytes, properties: Any) -> None:
            receive(topic, packet, 1, properties, mid)

        def qos_2(mid: int, packet: bytes, topic: str | bytes, properties: Any) -> None:
            # Subscriptions are QoS <= 1, so a broker should never send QoS 2; if one does,
            # it is stored like QoS 1 and answered with PUBREC after commit.
            receive(topic, packet, 2, properties, mid)

        handler._handle_pingresp_packet = pingresp
        handler._handle_packet = handle_packet_fast
        handler._handle_qos_1_publish_packet = qos_1
        handler._handle_qos_2_publish_packet = qos_2

    def write(self, data: bytes) -> bool:
        """Write raw packets to the current connection; False when there is none."""
        protocol = _protocol(self)
        if protocol is None:
            return False
        protocol.write_data(data)
        return True

    def gate_reads(self, room: asyncio.Event) -> None:
        """Make gmqtt's read loop wait for ``room`` before it parses more packets.

        Pausing the transport alone is not enough: gmqtt reads through an asyncio
        StreamReader, which resumes the transport whenever its own buffer drains, and the
        read loop parses a whole buffer (hundreds of messages) without yielding.
        """
        protocol = _protocol(self)
        if protocol is None or getattr(protocol, "_flux_gated", False):
            return
        read = protocol.read

        async def gated_read(n: int = -1) -> bytes:
            if not room.is_set():
                await room.wait()
            data: bytes = await read(n)
            return data

        protocol.read = gated_read
        protocol._flux_gated = True

    async def ping(self, timeout: float) -> None:
        """Send a PINGREQ and wait for its PINGRESP: the broker answers only after reading
        every packet sent before it. Raises ``TimeoutError`` or ``OSError``."""
        self._pong.clear()
        self._send_simple_command(MQTTCommands.PINGREQ)
        await asyncio.wait_for(self._pong.wait(), timeout)


def parse_publish(receive: Receiver, cmd: int, packet: bytes, v5: bool) -> bool:
    """Hand a PUBLISH without properties to ``receive``; False leaves it to gmqtt."""
    try:
        end = 2 + ((packet[0] << 8) | packet[1])
        if end == 2 or end > len(packet):
            return False  # empty topic (an alias, which gmqtt resolves) or a broken packet
        topic = packet[2:end].decode("utf-8")
        qos = (cmd >> 1) & 3
        mid = None
        if qos:
            mid = (packet[end] << 8) | packet[end + 1]
            end += 2
        if v5:
            if packet[end]:
                return False  # properties (user properties, aliases...): gmqtt parses them
            end += 1
    except (IndexError, UnicodeDecodeError):
        return False
    receive(topic, packet[end:], qos, {}, mid)
    return True


class PublisherClient(gmqtt.Client):  # type: ignore[misc]
    """gmqtt client whose PUBACKs go to ``on_puback(mid, reason)`` and whose (re)connects
    go to ``on_session``; it writes raw packets with ``send``."""

    def __init__(
        self,
        *args: Any,
        on_puback: Callable[[int, int], None],
        on_session: Callable[[bool], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)

        def puback(cmd: int, packet: bytes) -> None:
            on_puback(_MID.unpack_from(packet)[0], packet[2] if len(packet) > 2 else 0)

        self._package_handler._handle_puback_packet = puback
        self.on_connect = lambda *_: on_session(True)
        self.on_disconnect = lambda *_: on_session(False)

    def receive_maximum(self) -> int | None:
        """The broker's Receive Maximum from its CONNACK, if it announced one."""
        value: Any = self._package_handler._connack_properties.get("receive_maximum")
        if isinstance(value, list):
            value = value[0] if value else None
        return value if isinstance(value, int) and value > 0 else None

    def send(self, data: bytes) -> bool:
        """Write ``data`` to the connection; False when there is none to write to."""
        protocol = _protocol(self)
        transport = getattr(protocol, "_transport", None)
        if transport is None or transport.is_closing() or not self.is_connected:
            return False
        protocol.write_data(data)
        return True


async def connect(
    client: gmqtt.Client, config: MqttConfig, *, version: int, timeout_s: float, what: str
) -> None:
    """Connect ``client`` to the configured broker (credentials, TLS, keepalive), or raise
    ``MqttConnectError`` ("cannot connect <what> host:port") after closing the attempt."""
    if config.username:
        client.set_auth_credentials(config.username, config.password or None)
    try:
        await asyncio.wait_for(
            client.connect(
                config.host,
                config.port,
                ssl=tls_context(config),
                keepalive=config.keepalive_s,
                version=version,
            ),
            timeout_s,
        )
    except Exception as exc:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 2)
        error = MqttUnreachable if _may_come_up(exc) else MqttConnectError
        detail = str(exc) or type(exc).__name__
        raise error(f"cannot connect {what} {config.host}:{config.port}: {detail}") from exc


#: CONNACK reason codes that say the broker itself is not ready yet (3.1.1: 3; MQTT 5:
#: server unavailable, server busy).
_TRANSIENT_REFUSALS = frozenset({3, 0x88, 0x89})


def _may_come_up(exc: BaseException) -> bool:
    """Whether a failed connect may succeed later by itself: nothing listening, no route,
    no name yet, no answer in time, a broker not ready. A refused password or an untrusted
    certificate will not fix itself."""
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return False
    if isinstance(exc, MQTTConnectError):
        return bool(exc.args) and exc.args[0] in _TRANSIENT_REFUSALS
    return isinstance(exc, OSError | TimeoutError)


def tls_context(config: MqttConfig) -> ssl.SSLContext | bool:
    """The TLS context of an ``mqtts://`` (or ``tls = true``) broker, else False."""
    if not config.uses_tls:
        return False
    context = ssl.create_default_context(cafile=config.tls_ca_file or None)
    if config.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


__all__ = [
    "IngestClient",
    "MQTTv50",
    "MQTTv311",
    "PublisherClient",
    "Receiver",
    "connect",
    "parse_publish",
    "tls_context",
]
