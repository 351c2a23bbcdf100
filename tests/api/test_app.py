"""The HTTP API served by the running gateway (real uvicorn, real SQLite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import make_settings, unique


@pytest.fixture
async def api(tmp_path: Path, broker: tuple[str, int], serve_gateway: Any) -> Any:
    settings = make_settings(tmp_path, broker, server={"api_token": "t0ken"})
    async with (
        serve_gateway(settings) as (_gateway, server),
        httpx.AsyncClient(
            base_url=server.url,
            headers={"Authorization": "Bearer t0ken"},
            timeout=30,
        ) as client,
    ):
        yield client


async def test_post_event_returns_201_once_stored_and_the_device_appears(api: Any) -> None:
    dev = unique("dev")
    response = await api.post(
        "/api/v1/event",
        json={
            "topic": f"devices/{dev}/telemetry",
            "payload": {"temperature": 31.5, "humidity": 40},
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["device_id"] == dev and len(body["id"]) == 32
    events = (await api.get(f"/api/v1/devices/{dev}/events")).json()
    assert [e["payload"] for e in events] == [{"temperature": 31.5, "humidity": 40}]
    assert events[0]["id"] == body["id"]
    device = (await api.get(f"/api/v1/devices/{dev}")).json()
    assert device["message_count"] == 1
    assert device["last_seen"].endswith("+00:00")


async def test_post_events_stores_a_batch_in_order(api: Any) -> None:
    dev = unique("dev")
    items = [{"topic": f"devices/{dev}/telemetry", "payload": {"seq": i}} for i in range(250)]
    response = await api.post("/api/v1/events", json=items)
    assert response.status_code == 201, response.text
    assert response.json()["count"] == 250
    events = (await api.get(f"/api/v1/devices/{dev}/events", params={"limit": 1000})).json()
    assert sorted(e["payload"]["seq"] for e in events) == list(range(250))


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 422),
        (b"[]", 422),
        (b'{"topic": "devices/x/t"}', 422),
        (b'{"topic": "devices/x/t", "payload": [1]}', 422),
        (b'{"topic": "", "payload": {}}', 422),
        (b'{"topic": "devices/x/t", "payload": {"big": "' + b"x" * 300_000 + b'"}}', 422),
    ],
)
async def test_invalid_events_get_a_json_4xx_and_nothing_is_stored(
    api: Any, body: bytes, status: int
) -> None:
    response = await api.post(
        "/api/v1/event", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    error = response.json()
    assert error["message"] and error["error"]
    assert (await api.get("/api/v1/devices/x/events")).json() == []


async def test_the_short_ingest_path_answers_as_fastapi_does(api: Any) -> None:
    """``flux.api.fast_ingest`` takes exactly ``{"topic", "payload"}``; an extra key sends the
    same event through FastAPI. Both must answer alike, for success and for refusal."""
    dev = unique("dev")
    topic = f"devices/{dev}/telemetry"
    deep: dict[str, Any] = {}
    for _ in range(300):
        deep = {"a": deep}
    answers = []
    for extra in ({}, {"note": "through FastAPI"}):
        ok = await api.post("/api/v1/event", json={"topic": topic, "payload": {"t": 1}, **extra})
        refused = await api.post("/api/v1/event", json={"topic": topic, "payload": deep, **extra})
        assert ok.status_code == 201 and refused.status_code == 422
        answers.append((sorted(ok.json()), ok.json()["device_id"], refused.json()))
    assert answers[0] == answers[1]
    assert answers[0][2]["reason"] == "too_deep"
    events = (await api.get(f"/api/v1/devices/{dev}/events")).json()
    assert [e["payload"] for e in events] == [{"t": 1}, {"t": 1}]
    metrics = (await api.get("/metrics")).text
    assert 'route="/api/v1/event",status="201"' in metrics
    assert 'route="/api/v1/event",status="422"' in metrics


async def test_a_bad_event_rejects_the_whole_batch(api: Any) -> None:
    dev = unique("dev")
    items: list[dict[str, Any]] = [
        {"topic": f"devices/{dev}/t", "payload": {"ok": 1}},
        {"topic": f"devices/{dev}/t", "payload": {"x": "y" * 300_000}},
    ]
    response = await api.post("/api/v1/events", json=items)
    assert response.status_code == 422
    assert "events[1]" in response.json()["message"]
    assert (await api.get(f"/api/v1/devices/{dev}/events")).json() == []


async def test_api_requires_the_bearer_token(api: Any) -> None:
    for headers in (
        {"Authorization": ""},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic t0ken"},
    ):
        response = await api.get("/api/v1/devices", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"] == "Unauthorized"
    response = await api.post(
        "/api/v1/event",
        headers={"Authorization": "Bearer nope"},
        json={"topic": "devices/x/t", "payload": {}},
    )
    assert response.status_code == 401
    assert (await api.get("/api/v1/devices")).status_code == 200
    # Operations endpoints stay open for probes and scrapers.
    assert (await api.get("/health", headers={"Authorization": ""})).status_code == 200


async def test_health_ready_metrics_and_openapi(api: Any) -> None:
    assert (await api.get("/health")).json()["status"] == "ok"
    ready = await api.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    metrics = (await api.get("/metrics")).text
    for name in (
        "flux_events_published_total",
        "flux_eventbus_depth",
        "flux_mqtt_connected",
        "flux_db_batch_size",
        "flux_http_request_duration_seconds",
    ):
        assert name in metrics
    assert (await api.get("/openapi.json")).json()["info"]["title"] == "flux"
    assert (await api.get("/docs")).status_code == 200


async def test_dashboard_status_and_alerts(api: Any) -> None:
    page = await api.get("/", headers={"Authorization": ""})
    assert page.status_code == 200 and "flux gateway" in page.text
    status = (await api.get("/api/v1/status")).json()
    assert status["ready"]["database"] is True
    assert status["bus_capacity"] == 1024 and "store" in status["bus_depth"]
    assert (await api.get("/api/v1/alerts", params={"rule_id": "x"})).json() == []
    assert (await api.get("/api/v1/status", headers={"Authorization": ""})).status_code == 401


async def test_unknown_device_and_route_are_json_404(api: Any) -> None:
    response = await api.get("/api/v1/devices/nobody")
    assert response.status_code == 404 and response.json()["error"] == "NotFound"
    response = await api.get("/api/v1/nothing-here")
    assert response.status_code == 404 and "message" in response.json()


@pytest.mark.parametrize(
    ("eventbus", "expected"),
    [
        ({"overflow": "drop_newest"}, {"store": "drop_newest", "pipeline": "drop_newest"}),
        (
            {"overflow": "drop_oldest", "store_overflow": "block"},
            {"store": "block", "pipeline": "drop_oldest"},
        ),
        ({"pipeline_overflow": "drop_newest"}, {"store": "block", "pipeline": "drop_newest"}),
    ],
)
async def test_eventbus_overflow_applies_to_every_subscriber_unless_overridden(
    tmp_path: Path,
    broker: tuple[str, int],
    serve_gateway: Any,
    eventbus: dict[str, str],
    expected: dict[str, str],
) -> None:
    settings = make_settings(tmp_path, broker, eventbus=eventbus)
    async with (
        serve_gateway(settings) as (_gateway, server),
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        status = (await client.get("/api/v1/status")).json()
    assert status["bus_overflow"] == expected
