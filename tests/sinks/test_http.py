"""HTTP sinks end to end: a gateway POSTing device telemetry to a real local HTTP server that
fails, hangs, then answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.harness import Device, HookServer, make_settings, unique, wait_until

pytestmark = pytest.mark.slow

RETRY_CAP_S = 0.5
TIMEOUT_S = 1.0


async def test_500_then_a_timeout_then_200_delivers_everything_in_order_with_a_capped_backoff(
    tmp_path: Path, broker: tuple[str, int], start_gateway: Any
) -> None:
    dev = unique("dev")
    server = HookServer()
    await server.start()
    server.statuses = [500, 500, 500]
    sink = {
        "type": "http",
        "url": server.url,
        "headers": {"authorization": "Bearer ingest-token"},
        "topics": [f"devices/{dev}/telemetry"],
        "batch_size": 50,
        "timeout_s": TIMEOUT_S,
        "retry_max_delay_s": RETRY_CAP_S,
    }
    settings = make_settings(tmp_path, broker, device_ids=[dev], sinks={"ingest": sink})
    sim = Device(*broker)
    try:
        async with start_gateway(settings) as gateway:
            sim.publish_all(
                [(f"devices/{dev}/telemetry", orjson.dumps({"seq": n})) for n in range(120)]
            )
            await wait_until(lambda: len(server.received) >= 3, timeout=30, what="three 500s")
            server.hang = True
            await wait_until(lambda: len(server.received) >= 4, timeout=30, what="a hung request")
            server.hang = False
            await wait_until(
                lambda: gateway.sinks.describe_one("ingest")["backlog_rows"] == 0,
                timeout=60,
                what="everything delivered",
            )
            described = gateway.sinks.describe_one("ingest")
        # The three 500s and the hung request delivered nothing; the rest are the rows.
        rows = [row for request in server.received[4:] for row in orjson.loads(request.body)]
        assert [row["payload"]["seq"] for row in rows] == list(range(120))
        assert all(row["device_id"] == dev and len(row["id"]) == 32 for row in rows)
        assert all(r.headers["authorization"] == "Bearer ingest-token" for r in server.received)
        assert max(len(orjson.loads(r.body)) for r in server.received) <= 50
        gaps = [b.at - a.at for a, b in zip(server.received, server.received[1:4], strict=False)]
        assert all(gap <= RETRY_CAP_S + 0.5 for gap in gaps), f"backoff not capped: {gaps}"
        assert described["sent"] == 120
    finally:
        sim.close()
        await server.stop()
