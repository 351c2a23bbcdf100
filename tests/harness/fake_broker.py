"""A scripted MQTT v5 broker for exact protocol bytes: what the gateway acknowledges, when.

Only what the PUBACK tests need: CONNECT/CONNACK, SUBSCRIBE/SUBACK, PINGREQ, sending QoS 1
PUBLISH packets and recording every packet the client sends back."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    multiplier, length = 1, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


@dataclass
class Session:
    """One client connection and the packet ids it acknowledged, in order."""

    writer: asyncio.StreamWriter
    pubacks: list[int] = field(default_factory=list)
    puback_event: asyncio.Event = field(default_factory=asyncio.Event)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def publish(self, topic: str, payload: bytes, packet_id: int) -> None:
        encoded = topic.encode()
        body = len(encoded).to_bytes(2, "big") + encoded + packet_id.to_bytes(2, "big")
        body += b"\x00" + payload  # no properties
        self.writer.write(_packet(0x32, body))

    def drop(self) -> None:
        self.writer.close()


class FakeBroker:
    """Accept connections on a free loopback port; expose each as a ``Session``."""

    def __init__(self) -> None:
        self.sessions: asyncio.Queue[Session] = asyncio.Queue()
        #: Every session so far, and an event set whenever one subscribes.
        self.all: list[Session] = []
        self._subscribed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> FakeBroker:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def subscriber(self, timeout: float = 10, *, besides: Session | None = None) -> Session:
        """The first session that subscribed (``besides`` another one): the gateway's ingest
        (its other sessions, such as the one its rule publishes go out on, never subscribe)."""
        async with asyncio.timeout(timeout):
            while True:
                for session in self.all:
                    if session.subscribed.is_set() and session is not besides:
                        return session
                self._subscribed.clear()
                await self._subscribed.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        session = Session(writer)
        try:
            first, _ = await _read_packet(reader)
            assert first >> 4 == 1, "expected CONNECT"
            writer.write(_packet(0x20, b"\x00\x00\x00"))  # CONNACK: no session, success
            await self.sessions.put(session)
            self.all.append(session)
            while True:
                first, body = await _read_packet(reader)
                kind = first >> 4
                if kind == 8:  # SUBSCRIBE
                    packet_id = body[:2]
                    writer.write(_packet(0x90, packet_id + b"\x00\x01"))
                    session.subscribed.set()
                    self._subscribed.set()
                elif kind == 4:  # PUBACK
                    session.pubacks.append(int.from_bytes(body[:2], "big"))
                    session.puback_event.set()
                elif kind == 12:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            session.closed.set()
            with contextlib.suppress(Exception):
                writer.close()
            self._tasks.discard(task)
