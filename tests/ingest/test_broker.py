"""The broker the gateway talks to: the embedded Mosquitto or amqtt carrying messages to
the database, and the warning amqtt gives."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from flux.config import MqttConfig
from flux.ingest.broker import EmbeddedBroker
from flux.store.schema import events
from tests.harness import Device, free_port, make_settings, mosquitto_available, unique, wait_until


@pytest.mark.parametrize(
    ("embedded", "why"), [("auto", "mosquitto is not on PATH"), ("amqtt", "mqtt.embedded")]
)
async def test_amqtt_warns_that_queued_messages_do_not_survive_a_restart(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    embedded: str,
    why: str,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no mosquitto here
    config = MqttConfig(url=f"mqtt://127.0.0.1:{free_port()}", embedded=embedded)
    broker = EmbeddedBroker.choose(config)
    assert broker.kind == "amqtt"
    with caplog.at_level(logging.WARNING, logger="flux.ingest.broker"):
        async with broker:
            pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert why in warnings[0]
    assert "do not survive a restart of this process" in warnings[0]
    assert "apt install mosquitto" in warnings[0]


async def test_mosquitto_starts_without_that_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if not mosquitto_available():
        pytest.skip("mosquitto is not on PATH")
    config = MqttConfig(
        url=f"mqtt://127.0.0.1:{free_port()}",
        embedded="mosquitto",
        embedded_data_dir=str(tmp_path / "broker"),
    )
    with caplog.at_level(logging.WARNING, logger="flux.ingest.broker"):
        async with EmbeddedBroker.choose(config):
            pass
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
async def test_embedded_broker_carries_messages_to_the_database(
    tmp_path: Path, start_gateway: Any, kind: str
) -> None:
    if kind == "mosquitto" and not mosquitto_available():
        pytest.skip("mosquitto is not on PATH")
    dev = unique("dev")
    port = free_port()
    settings = make_settings(
        tmp_path, ("127.0.0.1", port), device_ids=[dev], mqtt={"embedded": kind}
    )
    async with start_gateway(settings) as gateway:
        assert gateway.broker is not None and gateway.broker.kind == kind
        messages: list[tuple[str, bytes | str]] = [
            (f"devices/{dev}/telemetry", orjson.dumps({"seq": i})) for i in range(50)
        ]
        # The simulator blocks while it waits for PUBACKs: keep it off the loop amqtt runs on.
        sim = await asyncio.to_thread(Device, "127.0.0.1", port)
        try:
            await asyncio.to_thread(sim.publish_all, messages)
        finally:
            await asyncio.to_thread(sim.close)

        async def all_stored() -> bool:
            assert gateway.engine is not None
            async with gateway.engine.connect() as conn:
                count = (await conn.execute(select(func.count()).select_from(events))).scalar()
            return count == 50

        await wait_until(all_stored, what="50 events stored through the embedded broker")
    if kind == "mosquitto":
        # Mosquitto saves its persistence file when it stops: it must be able to write it.
        assert (tmp_path / "broker" / "mosquitto.db").exists()
