"""Fixtures: a real MQTT broker, real SQLite files, a real PostgreSQL, a running gateway."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from flux.api.server import HttpServer
from flux.app import Gateway, serve
from flux.config import Settings, load_settings
from tests.harness import (
    PrivateMosquitto,
    Upstream,
    mosquitto_available,
    port_open,
    upstream_broker,
)

PG_URL = os.environ.get("FLUX_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def broker() -> Iterator[tuple[str, int]]:
    """The machine's Mosquitto on 1883 when it runs, else a private one, else embedded amqtt."""
    if port_open("127.0.0.1", 1883):
        yield ("127.0.0.1", 1883)
        return
    if mosquitto_available():
        private = PrivateMosquitto()
        private.start()
        yield ("127.0.0.1", private.port)
        private.cleanup()
        return
    from tests.harness import free_port

    port = free_port()
    ready: Any = {}

    def serve() -> None:
        from flux.ingest.broker import EmbeddedBroker

        async def main() -> None:
            async with EmbeddedBroker(
                kind="amqtt",
                host="127.0.0.1",
                port=port,
                data_dir=Path("."),
                max_payload_bytes=1 << 20,
            ):
                ready["loop"] = asyncio.get_running_loop()
                ready["stop"] = asyncio.Event()
                await ready["stop"].wait()

        asyncio.run(main())

    import threading

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    from tests.harness import wait_port

    wait_port("127.0.0.1", port)
    yield ("127.0.0.1", port)
    ready["loop"].call_soon_threadsafe(ready["stop"].set)
    thread.join(10)


def _pg_reachable() -> bool:
    return port_open("127.0.0.1", 5432)


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    if not _pg_reachable():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    import asyncpg

    base = PG_URL.replace("postgresql+asyncpg://", "postgresql://")
    name = f"flux_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = await asyncpg.connect(base)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL at {base} refused the test connection: {exc}")
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    yield PG_URL.rsplit("/", 1)[0] + "/" + name
    admin = await asyncpg.connect(base)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


GatewayFactory = Callable[[Settings], Awaitable[Gateway]]


@pytest.fixture
async def start_gateway() -> AsyncIterator[Callable[[Settings], Any]]:
    """Start gateways (no HTTP) for a test and stop them (in stages) when it ends."""
    running: list[Gateway] = []

    @asynccontextmanager
    async def _start(settings: Settings) -> AsyncIterator[Gateway]:
        gateway = Gateway(settings=settings)
        await gateway.__aenter__()
        running.append(gateway)
        try:
            yield gateway
        finally:
            if gateway in running:
                running.remove(gateway)
                await gateway.__aexit__(None, None, None)

    yield _start
    for gateway in running:
        await gateway.__aexit__(None, None, None)


@pytest.fixture
async def serve_gateway() -> AsyncIterator[Callable[[Settings], Any]]:
    """Serve gateways with their HTTP API, as ``flux run`` does: ``async with
    serve_gateway(settings) as (gateway, http)``; stopped in stages when the block ends."""

    @asynccontextmanager
    async def _serve(settings: Settings) -> AsyncIterator[tuple[Gateway, HttpServer]]:
        gateway = Gateway(settings=settings)
        async with serve(gateway) as http:
            yield gateway, http

    yield _serve


@pytest.fixture
def shipped_settings() -> Settings:
    return load_settings(Path(__file__).resolve().parents[1] / "config.toml", environ={})


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    """A private upstream broker (TLS, a password) for sinks to forward to."""
    yield from upstream_broker(tmp_path)


@pytest.fixture
def mosquitto() -> Iterator[PrivateMosquitto]:
    """A Mosquitto of the test's own (persistence on): one the test may stop and restart, or
    whose shared subscriptions and sessions no other test sees."""
    if not mosquitto_available():
        pytest.skip("mosquitto is not on PATH; this test needs a private broker")
    broker = PrivateMosquitto(persistent=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.cleanup()
