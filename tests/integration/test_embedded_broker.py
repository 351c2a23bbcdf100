"""The embedded broker starts when nothing answers at the configured address."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from flux.store.schema import events
from tests.harness import Device, free_port, make_settings, mosquitto_available, unique, wait_until


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
