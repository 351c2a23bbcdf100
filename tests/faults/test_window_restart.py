"""Open windows survive a SIGKILL: a count window half full when the gateway dies is
completed by the readings after the restart (its partial was committed with the batch)."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import httpx
import orjson

from flux.store.schema import alerts
from tests.harness import Db, GatewayProcess, unique, wait_until
from tests.harness import write_config as _write_config

RULE = """
[[rules]]
id = "every-four"
topic = "devices/+/telemetry"
window = { type = "count", size_n = 4 }
select = { n = "count()", total = "sum(v)" }
actions = [{ type = "alert", severity = "info" }]
"""


async def post(gateway: GatewayProcess, device: str, value: int) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
        body = {"topic": f"devices/{device}/telemetry", "payload": {"v": value}}
        response = await client.post("/api/v1/event", json=body)
        assert response.status_code == 201, response.text


async def test_a_half_full_window_is_completed_after_a_sigkill(
    tmp_path: Path, broker: tuple[str, int]
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/flux.db"
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "window.toml").write_text(RULE)
    config = _write_config(tmp_path, mqtt_port=broker[1], dev=unique("dev"), database_url=url)
    device = unique("dev")
    db = Db(url)
    first = GatewayProcess(config, name="first")
    second = GatewayProcess(config, name="second")
    try:
        first.start()
        await first.wait_ready()
        for value in (1, 2):  # 201 once the events and the window's partial are committed
            await post(first, device, value)
        first.signal(signal.SIGKILL)
        await first.wait_exit()
        second.start()
        await second.wait_ready()
        for value in (3, 4):
            await post(second, device, value)
        await wait_until(lambda: db.count(alerts, alerts.c.device_id == device), timeout=10)
        with sqlite3.connect(tmp_path / "flux.db") as conn:
            rows = conn.execute(
                "SELECT output FROM alerts WHERE device_id = ?", (device,)
            ).fetchall()
        outputs = [orjson.loads(output) for (output,) in rows]
        assert len(outputs) == 1
        assert (outputs[0]["n"], outputs[0]["total"]) == (4, 10)
    finally:
        first.kill()
        second.kill()
        await db.close()
