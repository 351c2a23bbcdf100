"""The sinks as an operator and a rule author see them: the forward action, the API (pause,
resume), the metrics and the ``sink_backlog`` degraded reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY

from tests.harness import Device, HookServer, make_settings, metric_value, unique, wait_until

pytestmark = pytest.mark.slow

FORWARD_RULES = """
[[rules]]
id = "hot"
topic = "devices/+/telemetry"
when = "temperature > 30"
actions = [ { type = "forward", sink = "ingest" } ]

[[rules]]
id = "summary"
topic = "devices/+/telemetry"
script = "if temperature > 35 then return { level = 'critical', t = temperature } end return false"
actions = [ { type = "forward", sink = "ingest" } ]
"""


@pytest.fixture
async def hooks() -> Any:
    server = HookServer()
    await server.start()
    yield server
    await server.stop()


def _settings(tmp_path: Path, broker: tuple[str, int], dev: str, hooks: HookServer) -> Any:
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "rules" / "forward.toml").write_text(FORWARD_RULES)
    sink = {"type": "http", "url": hooks.url, "alert_after_s": 0.5, "retry_max_delay_s": 0.5}
    return make_settings(tmp_path, broker, device_ids=[dev], sinks={"ingest": sink})


def _rows(hooks: HookServer) -> list[dict[str, Any]]:
    return [row for request in hooks.received for row in orjson.loads(request.body)]


async def test_rules_forward_matches_and_operators_pause_and_resume_a_sink(
    tmp_path: Path, broker: tuple[str, int], hooks: HookServer, serve_gateway: Any
) -> None:
    dev = unique("dev")
    topic = f"devices/{dev}/telemetry"
    sim = Device(*broker)
    sent_before = REGISTRY.get_sample_value("flux_sink_sent_total", {"sink": "ingest"}) or 0.0
    try:
        async with (
            serve_gateway(_settings(tmp_path, broker, dev, hooks)) as (_gateway, server),
            httpx.AsyncClient(base_url=f"{server.url}/api/v1") as api,
        ):
            sim.publish_all([(topic, orjson.dumps({"temperature": t})) for t in (20, 31, 36)])
            await wait_until(lambda: len(_rows(hooks)) == 3, timeout=30, what="3 forwards")
            forwarded = _rows(hooks)
            assert [row["payload"] for row in forwarded] == [
                {"temperature": 31},
                {"temperature": 36},
                {"level": "critical", "t": 36},
            ]
            assert {row["device_id"] for row in forwarded} == {dev}

            paused = (await api.post("/sinks/ingest/pause")).json()
            assert paused["paused"] is True
            sim.publish_all([(topic, orjson.dumps({"temperature": 33}))])
            described: dict[str, Any] = {}

            async def waiting() -> bool:
                nonlocal described
                described = (await api.get("/sinks/ingest")).json()
                return bool(described["backlog_rows"] == 1 and described["oldest_age_s"] > 0.5)

            await wait_until(waiting, timeout=30, what="a row older than alert_after_s")
            ready = await server_get(server.url, "/ready")
            assert ready.status_code == 200, "a sink that is merely behind keeps /ready at 200"
            assert "sink_backlog" in ready.json()["degraded"]

            async def gauges_report_it() -> bool:
                metrics = (await server_get(server.url, "/metrics")).text
                return (
                    metric_value(metrics, "flux_degraded", reason="sink_backlog") == 1.0
                    and metric_value(metrics, "flux_sink_backlog", sink="ingest") == 1.0
                )

            await wait_until(gauges_report_it, timeout=10, what="the backlog gauges")
            assert len(_rows(hooks)) == 3, "a paused sink sends nothing"

            resumed = (await api.post("/sinks/ingest/resume")).json()
            assert resumed["paused"] is False
            await wait_until(lambda: len(_rows(hooks)) == 4, timeout=30, what="sent after resume")

            async def caught_up() -> bool:
                response = await server_get(server.url, "/ready")
                return "sink_backlog" not in response.json()["degraded"]

            await wait_until(caught_up, timeout=30, what="sink_backlog cleared")
            listed = {sink["name"]: sink for sink in (await api.get("/sinks")).json()}
            assert set(listed) == {"local", "webhooks", "ingest"}
            assert listed["ingest"]["sent"] == 4 and listed["ingest"]["type"] == "http"
            assert (await api.post("/sinks/nowhere/pause")).status_code == 404

            async def gauges_cleared() -> bool:
                metrics = (await server_get(server.url, "/metrics")).text
                return (
                    metric_value(metrics, "flux_sink_oldest_age_seconds", sink="ingest") == 0.0
                    and metric_value(metrics, "flux_degraded", reason="sink_backlog") == 0.0
                )

            await wait_until(gauges_cleared, timeout=10, what="the gauges back to 0")
            metrics = (await server_get(server.url, "/metrics")).text
            sent = metric_value(metrics, "flux_sink_sent_total", sink="ingest") or 0.0
            assert sent - sent_before == 4.0
            assert metric_value(metrics, "flux_sink_connected", sink="ingest") == 1.0
    finally:
        sim.close()


async def server_get(base_url: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url) as client:
        return await client.get(path)
