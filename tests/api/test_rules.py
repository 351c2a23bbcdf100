"""The rules API with window rules: validation errors name the key, tests take timed events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import make_settings

WINDOW_RULE = {
    "id": "api-window",
    "topic": "devices/+/telemetry",
    "window": {"type": "tumbling", "size_s": 60},
    "select": {"avg_t": "avg(temperature)", "n": "count()"},
    "when": "avg_t > 25",
    "actions": [{"type": "alert"}],
}


@pytest.fixture
async def api(tmp_path: Path, broker: tuple[str, int], serve_gateway: Any) -> Any:
    settings = make_settings(tmp_path, broker)
    async with (
        serve_gateway(settings) as (_gateway, server),
        httpx.AsyncClient(base_url=f"{server.url}/api/v1", timeout=30) as client,
    ):
        yield client


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"window": {"type": "hopping", "size_s": 10}}, "window.hopping.every_s"),
        ({"select": {"x": "median(temperature)"}}, "select.x"),
        ({"when": "avg_t >"}, "does not compile"),
    ],
)
async def test_a_bad_window_rule_is_refused_naming_the_key(
    api: Any, change: dict[str, Any], fragment: str
) -> None:
    response = await api.post("/rules", json={**WINDOW_RULE, **change})
    assert response.status_code == 422, response.text
    assert fragment in response.json()["message"]
    assert (await api.get("/rules/api-window")).status_code == 404


async def test_a_window_rule_is_created_and_tested_with_timed_events(api: Any) -> None:
    created = await api.post("/rules", json=WINDOW_RULE)
    assert created.status_code == 201, created.text
    assert created.json()["rule"]["rule"]["window"] == {"type": "tumbling", "size_s": 60.0}
    events = [
        {"payload": {"temperature": 20}, "ts": 1_700_000_041, "device_id": "d1"},
        {"payload": {"temperature": 40}, "ts": 1_700_000_042, "device_id": "d1"},
        {"payload": {"temperature": 10}, "ts": 1_700_000_101, "device_id": "d1"},
    ]
    tested = await api.post("/rules/api-window/test", json={"events": events})
    assert tested.status_code == 200, tested.text
    body = tested.json()
    assert [(w["output"]["avg_t"], w["matched"], w["by"]) for w in body["windows"]] == [
        (30.0, True, "clock")
    ]
    assert body["still_open"] == 1
    closing = await api.post(
        "/rules/api-window/test", json={"events": events, "close_open": True}
    )
    assert [w["matched"] for w in closing.json()["windows"]] == [True, False]
    single = await api.post("/rules/api-window/test", json={"payload": {"temperature": 30}})
    assert single.status_code == 200 and single.json()["matched"] is True
    both = await api.post("/rules/api-window/test", json={"payload": {}, "events": events})
    assert both.status_code == 422


async def test_events_are_refused_for_a_rule_without_a_window(api: Any) -> None:
    rule = {"id": "plain", "topic": "devices/+/telemetry", "when": "temperature > 1"}
    assert (await api.post("/rules", json=rule)).status_code == 201
    response = await api.post(
        "/rules/plain/test", json={"events": [{"payload": {"temperature": 2}, "ts": 1.0}]}
    )
    assert response.status_code == 422
    assert "not a window rule" in response.json()["message"]
