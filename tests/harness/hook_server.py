"""A real HTTP/1.1 server on loopback that records POSTs: the far end of webhook tests."""

from __future__ import annotations

import asyncio
import contextlib
import http
import time
from dataclasses import dataclass
from typing import Any

from tests.harness.waiting import free_port


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    #: When it arrived (``time.monotonic()``).
    at: float = 0.0


class HookServer:
    """A real HTTP/1.1 server on 127.0.0.1 that records POSTs and answers as scripted."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[Received] = []
        self.statuses: list[int] = []  # answered in order, then ``default_status``
        self.default_status = 200
        self.answer_body = b"ok"
        self.hang = False  # read the request, never answer
        self.delay_s = 0.0  # wait this long before each answer (a slow receiver)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *lines = head.split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {}
                for line in lines:
                    if line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.received.append(Received(method, path, headers, body, time.monotonic()))
                if self.hang:
                    await asyncio.Event().wait()
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                status = self.statuses.pop(0) if self.statuses else self.default_status
                phrase = http.HTTPStatus(status).phrase
                writer.write(
                    f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain\r\n"
                    f"content-length: {len(self.answer_body)}\r\n\r\n".encode()
                    + self.answer_body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
