"""Serve the API over HTTP (uvicorn) and the Prometheus endpoint, each as a context manager.

uvicorn's internals (``Server.started``, its listening sockets, ``should_exit``) are touched
here only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Self

import uvicorn
from prometheus_client import start_http_server
from starlette.types import ASGIApp

from flux.config import MetricsConfig, ServerConfig

log = logging.getLogger(__name__)

#: How long the HTTP server may take to bind and start serving.
START_TIMEOUT_S = 10.0


class HttpServer:
    """Serve ``app`` for as long as the context is open; on exit, in-flight requests finish
    (up to ``close_timeout_s``) before the server stops."""

    def __init__(self, *, app: ASGIApp, config: ServerConfig, close_timeout_s: float) -> None:
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level="warning",
                lifespan="off",
                access_log=False,
            )
        )
        self._close_timeout_s = close_timeout_s
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port it listens on (useful when configured as 0)."""
        if not self._server.servers:
            raise RuntimeError("the HTTP server is not running")
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """The base URL of the API on loopback."""
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        if self._task is not None:
            raise RuntimeError("the HTTP server is already running")
        self._task = asyncio.create_task(self._server.serve(), name="http")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server stopped during start-up")
            if loop.time() > deadline:
                await self.__aexit__()
                raise RuntimeError(f"the HTTP server did not start within {START_TIMEOUT_S:g} s")
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(task, self._close_timeout_s)
        except (TimeoutError, Exception) as exc:
            log.warning("HTTP server did not stop cleanly: %s", exc or type(exc).__name__)


class MetricsServer:
    """Serve ``/metrics`` on ``metrics.port`` in a thread (nothing when the port is 0)."""

    def __init__(self, config: MetricsConfig) -> None:
        self._config = config
        self._server: Any = None

    async def __aenter__(self) -> Self:
        if self._config.port:
            self._server = start_http_server(self._config.port, addr=self._config.host)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        server, self._server = self._server, None
        if server is not None:
            http_server, _thread = server
            http_server.shutdown()
            http_server.server_close()


__all__ = ["HttpServer", "MetricsServer"]
