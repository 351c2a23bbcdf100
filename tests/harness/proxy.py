"""None"""

from __future__ import annotations

import threading
from contextlib import suppress
from typing import Any

from tests.harness.waiting import free_port


class MqttProxy:
    """A TCP proxy to a broker, on its own thread and loop, that can swallow one client's
    packets: ``blackhole("-pub")`` drops everything the connections whose MQTT client id ends
    with ``-pub`` send from then on (the broker never sees them, so it never answers), as a
    half-broken network would; ``heal()`` forwards again and ``drop_all()`` cuts every
    connection (what a gateway's death leaves in flight is gone)."""

    def __init__(self, broker_port: int) -> None:
        import asyncio

        self.broker_port = broker_port
        self.port = free_port()
        self._asyncio = asyncio
        self._loop = asyncio.new_event_loop()
        self._suffix: str | None = None
        self._server: Any = None
        self._writers: list[Any] = []
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise TimeoutError("the proxy did not start")

    def _run(self) -> None:
        asyncio = self._asyncio
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            self._started.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _serve(self, reader: Any, writer: Any) -> None:
        asyncio = self._asyncio
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
        self._writers += [writer, up_writer]
        client_id: list[str] = []

        async def upstream() -> None:
            head = b""
            while data := await reader.read(65536):
                if not client_id:
                    head += data
                    found = _connect_client_id(head)
                    if found is None:
                        continue
                    client_id.append(found)
                    data, head = head, b""
                if self._suffix is not None and client_id[0].endswith(self._suffix):
                    continue  # swallowed
                up_writer.write(data)
            up_writer.close()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
            writer.close()

        with suppress(Exception):
            await asyncio.gather(upstream(), downstream())

    def blackhole(self, suffix: str) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "_suffix", suffix)

    def heal(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "_suffix", None)

    def drop_all(self) -> None:
        def close() -> None:
            for writer in self._writers:
                writer.transport.abort()
            self._writers.clear()

        self._loop.call_soon_threadsafe(close)

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            for writer in self._writers:
                writer.transport.abort()
            await self._server.wait_closed()

        self._asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

def _connect_client_id(data: bytes) -> str | None:
    """The client id of the MQTT CONNECT at the start of ``data``, None until it is whole."""
    length, index = _varint(data, 1)
    if length is None or len(data) < index + length:
        return None
    index += 2 + int.from_bytes(data[index : index + 2], "big")  # the protocol name
    level = data[index]
    index += 4  # level, flags, keepalive
    if level >= 5:
        properties, index = _varint(data, index)
        index += properties or 0
    id_length = int.from_bytes(data[index : index + 2], "big")
    return data[index + 2 : index + 2 + id_length].decode()

def _varint(data: bytes, index: int) -> tuple[int | None, int]:
    """MQTT's variable byte integer at ``index``: (value, index after it); None if cut off."""
    value, shift = 0, 0
    while index < len(data):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        index += 1
        if not byte & 0x80:
            return value, index
        shift += 7
    return None, index
