"""Serve the API over HTTP(S) (uvicorn) and the Prometheus endpoint, each as a context manager.

uvicorn's internals (``Server.started``, its listening sockets, ``should_exit``, its signal
capture) are touched here only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from ssl import CERT_REQUIRED
from typing import Any, Self

import uvicorn
from prometheus_client import start_http_server
from starlette.types import ASGIApp

from flux.config import MetricsConfig, ServerConfig
from flux.errors import PortUnavailable
from flux.net import listen

log = logging.getLogger(__name__)

#: How long the HTTP server may take to bind and start serving.
START_TIMEOUT_S = 10.0


class _Server(uvicorn.Server):
    """uvicorn without its own SIGINT/SIGTERM handling: ``flux.app.run`` owns the signals
    and stops intake before the HTTP server closes."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """Serve ``app`` for as long as the context is open; on exit, in-flight requests finish
    (up to ``close_timeout_s``) before the server stops.

    The socket is bound here, not by uvicorn (which exits the process when a port is taken):
    a taken port is a ``PortUnavailable`` naming ``server.port``. With ``tls_cert_file`` it
    serves HTTPS, and with ``tls_client_ca_file`` it requires client certificates.
    """

    def __init__(self, *, app: ASGIApp, config: ServerConfig, close_timeout_s: float) -> None:
        self._config = config
        tls: dict[str, Any] = {}
        if config.uses_tls:
            tls = {"ssl_certfile": config.tls_cert_file, "ssl_keyfile": config.tls_key_file}
            if config.tls_client_ca_file:
                tls |= {"ssl_ca_certs": config.tls_client_ca_file, "ssl_cert_reqs": CERT_REQUIRED}
        self._server = _Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level="warning",
                lifespan="off",
                access_log=False,
                **tls,
            )
        )
        self._close_timeout_s = close_timeout_s
        self._socket: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    def reserve(self) -> None:
        """Bind the listening socket now (``PortUnavailable`` naming ``server.port`` if the
        port is taken), so a taken port stops start-up before anything else opens."""
        if self._socket is None:
            self._socket = listen(self._config.host, self._config.port, setting="server.port")

    def release(self) -> None:
        """Close a reserved socket the server never served on."""
        sock, self._socket = self._socket, None
        if sock is not None and self._task is None:
            sock.close()

    @property
    def port(self) -> int:
        """The port it listens on (useful when configured as 0)."""
        if not self._server.servers:
            raise RuntimeError("the HTTP server is not running")
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """The base URL of the API on loopback."""
        scheme = "https" if self._config.uses_tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        if self._task is not None:
            raise RuntimeError("the HTTP server is already running")
        self.reserve()
        assert self._socket is not None
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="http")
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
        config = self._config
        if config.port:
            try:
                self._server = start_http_server(config.port, addr=config.host)
            except OSError as exc:
                raise PortUnavailable(
                    f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
                    key="metrics.port",
                ) from None
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        server, self._server = self._server, None
        if server is not None:
            http_server, _thread = server
            http_server.shutdown()
            http_server.server_close()


__all__ = ["HttpServer", "MetricsServer"]
