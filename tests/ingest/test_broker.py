"""The embedded broker: what falling back to amqtt costs is said at start."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flux.config import MqttConfig
from flux.ingest.broker import EmbeddedBroker
from tests.harness import free_port, mosquitto_available


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
