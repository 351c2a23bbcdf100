"""Rules and plugins in the running gateway: real broker, real Lua, real WebAssembly."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select

from flux.app import Gateway
from flux.store.schema import alerts, dead_letters, devices, events
from tests.harness import (
    HookServer,
    Listener,
    PrivateMosquitto,
    device,
    make_settings,
    mosquitto_available,
    unique,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]


def frame(temp_centi: int, humidity: int, battery_mv: int, flags: int = 0) -> bytes:
    """A version-1 sensor frame as the shipped frame-decoder plugin reads it."""
    return struct.pack(">BhBHB", 1, temp_centi, humidity, battery_mv, flags)


async def _rows(gateway: Gateway, statement: Any) -> list[dict[str, Any]]:
    assert gateway.engine is not None
    async with gateway.engine.connect() as conn:
        return [dict(row) for row in (await conn.execute(statement)).mappings()]


@pytest.fixture
def shipped(tmp_path: Path, broker: tuple[str, int]) -> Any:
    dev = unique("dev")
    settings = make_settings(
        tmp_path,
        broker,
        device_ids=[dev],
        rules={"dir": str(ROOT / "rules")},
        plugins={"dir": str(ROOT / "plugins"), "cache_dir": str(tmp_path / "modules")},
    )
    return dev, settings


async def test_a_matching_message_gives_an_alert_row_and_a_republished_message(
    shipped: Any, broker: tuple[str, int], start_gateway: Any
) -> None:
    dev, settings = shipped
    listener = Listener(broker, f"alerts/{dev}/#")
    try:
        async with start_gateway(settings) as gateway:
            with device(*broker) as sim:
                sim.publish_all(
                    [
                        (
                            f"devices/{dev}/telemetry",
                            orjson.dumps({"temperature": 31.5, "humidity": 40}),
                        ),
                        (
                            f"devices/{dev}/telemetry",
                            orjson.dumps({"temperature": 21.5, "humidity": 40}),
                        ),
                    ]
                )

            async def alert_stored() -> bool:
                return bool(await _rows(gateway, select(alerts)))

            await wait_until(alert_stored, what="overheat alert row")
            [alert] = await _rows(gateway, select(alerts))
            assert alert["rule_id"] == "overheat" and alert["device_id"] == dev
            # The store and the pipeline commit independently: the event row may land later.
            by_id = select(events).where(events.c.id == alert["event_id"])

            async def event_stored() -> bool:
                return bool(await _rows(gateway, by_id))

            await wait_until(event_stored, what="the alert's event row")
            stored = await _rows(gateway, by_id)
            assert stored[0]["payload"] == {"temperature": 31.5, "humidity": 40}
            await wait_until(lambda: len(listener.messages) >= 1, what="republished alert")
            topic, body = listener.messages[0]
            assert topic == f"alerts/{dev}/overheat"
            assert body["device"] == dev
            # The enrich plugin ran on both readings (its outputs commit after the alert).
            enriched_rows = select(events).where(events.c.topic == f"devices/{dev}/enriched")

            async def both_enriched() -> bool:
                return len(await _rows(gateway, enriched_rows)) == 2

            await wait_until(both_enriched, what="two enriched events")
            enriched = await _rows(gateway, enriched_rows)
            assert all(row["hops"] == 1 for row in enriched)
            # Derived events are stored but are not the device's messages.
            [row] = await _rows(gateway, select(devices).where(devices.c.id == dev))
            assert row["message_count"] == 2
            assert row["last_payload"] == {"temperature": 21.5, "humidity": 40}
    finally:
        listener.close()


async def test_binary_frames_are_decoded_by_the_plugin_and_matched_by_rules(
    shipped: Any, broker: tuple[str, int], start_gateway: Any
) -> None:
    dev, settings = shipped
    async with start_gateway(settings) as gateway:
        with device(*broker) as sim:
            sim.publish_all(
                [
                    (f"devices/{dev}/raw", frame(3350, 45, 3012)),  # 33.5 °C, 45 %: overheat
                    (f"devices/{dev}/raw", b"\x09short"),  # unknown version: rejected
                ]
            )

        async def decoded() -> bool:
            rows = await _rows(
                gateway, select(events).where(events.c.topic == f"devices/{dev}/telemetry")
            )
            return len(rows) == 1

        await wait_until(decoded, what="decoded telemetry event")
        [telemetry] = await _rows(
            gateway, select(events).where(events.c.topic == f"devices/{dev}/telemetry")
        )
        assert telemetry["payload"]["temperature"] == pytest.approx(33.5)
        assert telemetry["payload"]["humidity"] == 45
        assert telemetry["hops"] == 1
        raw = await _rows(gateway, select(events).where(events.c.topic == f"devices/{dev}/raw"))
        assert len(raw) == 2 and "raw_base64" in raw[0]["payload"]

        async def alerted() -> bool:
            return bool(await _rows(gateway, select(alerts).where(alerts.c.rule_id == "overheat")))

        await wait_until(alerted, what="alert from a decoded frame")
        letters = await _rows(gateway, select(dead_letters))
        assert [row["reason"] for row in letters] == ["plugin_rejected"]
        assert bytes(letters[0]["payload"]) == b"\x09short"


HOSTILE = """
[[rules]]
id = "runaway"
topic = "devices/+/telemetry"
when = "(function() while true do end end)()"

[[rules]]
id = "hot"
topic = "devices/+/telemetry"
when = "temperature > 30"
actions = [{ type = "alert", severity = "critical" }]
"""


async def test_a_runaway_rule_is_quarantined_and_the_others_keep_running(
    tmp_path: Path, broker: tuple[str, int], start_gateway: Any
) -> None:
    dev = unique("dev")
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "rules.toml").write_text(HOSTILE)
    settings = make_settings(tmp_path, broker, device_ids=[dev], rules={"quarantine_after": 2})
    async with start_gateway(settings) as gateway:
        with device(*broker) as sim:
            sim.publish_all(
                [
                    (f"devices/{dev}/telemetry", orjson.dumps({"temperature": 35 + i}))
                    for i in range(5)
                ]
            )

        async def five_alerts() -> bool:
            return len(await _rows(gateway, select(alerts))) == 5

        await wait_until(five_alerts, what="alerts from the healthy rule")
        assert gateway.rules is not None
        status = gateway.rules.status("runaway")
        assert status is not None and status.status == "quarantined"
        assert status.last_error is not None and status.last_error["kind"] == "timeout"


async def test_rules_api_create_test_reload_disable_and_delete(
    tmp_path: Path, broker: tuple[str, int], serve_gateway: Any
) -> None:
    dev = unique("dev")
    settings = make_settings(tmp_path, broker, device_ids=[dev])
    rule = {
        "id": "cold",
        "topic": "devices/+/telemetry",
        "when": "temperature < 0",
        "actions": [{"type": "alert", "severity": "info"}],
    }
    async with (
        serve_gateway(settings) as (gateway, server),
        httpx.AsyncClient(
            base_url=f"{server.url}/api/v1", timeout=30
        ) as api,
    ):
        created = await api.post("/rules", json=rule)
        assert created.status_code == 201, created.text
        assert created.json()["rule"]["status"] == "active"
        assert (await api.post("/rules", json=rule)).status_code == 409
        broken = await api.post("/rules", json={**rule, "id": "broken", "when": "temperature <"})
        assert broken.status_code == 422
        assert broken.json()["error"] == "RuleCompileError"
        test = await api.post("/rules/cold/test", json={"payload": {"temperature": -4}})
        assert test.json()["matched"] is True
        reload = (await api.post("/rules/reload")).json()
        assert reload["result"] == "ok" and reload["active"] == 1
        stored = await api.post(
            "/event", json={"topic": f"devices/{dev}/telemetry", "payload": {"temperature": -4}}
        )
        assert stored.status_code == 201

        async def alerted() -> bool:
            return len(await _rows(gateway, select(alerts))) == 1

        await wait_until(alerted, what="alert from an API-created rule")
        disabled = await api.post("/rules/cold/disable")
        assert disabled.json()["rule"]["status"] == "disabled"
        await api.post(
            "/event", json={"topic": f"devices/{dev}/telemetry", "payload": {"temperature": -9}}
        )
        assert len(await _rows(gateway, select(alerts))) == 1
        assert (await api.delete("/rules/cold")).status_code == 200
        assert (await api.get("/rules/cold")).status_code == 404
        listing = (await api.get("/rules")).json()
        assert listing["rules"] == []


async def test_plugins_api_lists_pools_and_restarts(shipped: Any, serve_gateway: Any) -> None:
    _, settings = shipped
    async with (
        serve_gateway(settings) as (_gateway, server),
        httpx.AsyncClient(
            base_url=f"{server.url}/api/v1", timeout=30
        ) as api,
    ):
        listing = (await api.get("/plugins")).json()
        names = {p["name"] for p in listing["plugins"]}
        assert names == {"frame-decoder", "enrich", "batch-stats"}
        pool = (await api.get("/plugins/enrich")).json()["pool"]
        assert {"available", "max_size", "hits", "misses"} <= set(pool)
        restarted = await api.post("/plugins/enrich/restart")
        assert restarted.status_code == 200
        assert restarted.json()["restart_count"] >= 1
        assert (await api.get("/plugins/nope")).status_code == 404
        reloaded = (await api.post("/plugins/reload")).json()
        assert reloaded["errors"] == {}


async def test_a_rule_dropped_into_rules_and_reloaded_alerts_republishes_and_calls_a_webhook(
    tmp_path: Path, broker: tuple[str, int], serve_gateway: Any
) -> None:
    """The rule author's path: a new TOML file, POST /rules/reload, a matching message."""
    dev = unique("dev")
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    hook = HookServer()
    await hook.start()
    listener = Listener(broker, f"alerts/{dev}/#")
    settings = make_settings(tmp_path, broker, device_ids=[dev], webhooks={"base_delay_s": 0.05})
    try:
        async with (
            serve_gateway(settings) as (gateway, server),
            httpx.AsyncClient(
            base_url=f"{server.url}/api/v1", timeout=30
        ) as api,
        ):
            (rules_dir / "freezer.toml").write_text(
                "[[rules]]\n"
                'id = "freezer-warm"\n'
                'topic = "devices/+/telemetry"\n'
                'when = "temperature > -10"\n'
                "actions = [\n"
                '  { type = "alert", severity = "critical" },\n'
                '  { type = "publish", topic = "alerts/{device_id}/{rule_id}", qos = 1 },\n'
                f'  {{ type = "webhook", url = "{hook.url}" }},\n'
                "]\n"
            )
            reload = (await api.post("/rules/reload")).json()
            assert reload["result"] == "ok" and reload["active"] == 1, reload
            with device(*broker) as sim:
                sim.publish_all([(f"devices/{dev}/telemetry", b'{"temperature": -4.5}')])

            async def alerted() -> bool:
                return bool(await _rows(gateway, select(alerts)))

            await wait_until(alerted, what="alert row")
            await wait_until(lambda: len(listener.messages) == 1, what="republished message")
            await wait_until(lambda: len(hook.received) == 1, what="webhook call")
            call = orjson.loads(hook.received[0].body)
            assert call["rule_id"] == "freezer-warm"
            assert call["device_id"] == dev and call["payload"] == {"temperature": -4.5}
            assert listener.messages[0][0] == f"alerts/{dev}/freezer-warm"
    finally:
        listener.close()
        await hook.stop()


async def test_a_window_rule_alerts_and_publishes_after_its_window_closes_by_the_clock(
    tmp_path: Path, broker: tuple[str, int], start_gateway: Any
) -> None:
    """MQTT in, then nothing more: the window timer closes the window and its alert row
    and publish come out with the window's aggregates."""
    dev, quiet = unique("dev"), unique("quiet")
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "window.toml").write_text(
        "[[rules]]\n"
        'id = "avg-temp"\n'
        'topic = "devices/+/telemetry"\n'
        'window = { type = "tumbling", size_s = 1 }\n'
        'select = { avg_t = "avg(temperature)", n = "count()", hi = "max(temperature)" }\n'
        'when = "avg_t > 20"\n'
        "actions = [\n"
        '  { type = "alert", severity = "warning" },\n'
        '  { type = "publish", topic = "windows/{device_id}/{rule_id}", qos = 1 },\n'
        "]\n"
    )
    listener = Listener(broker, f"windows/{dev}/#")
    settings = make_settings(
        tmp_path, broker, device_ids=[dev, quiet], rules={"dir": str(rules_dir)}
    )
    try:
        async with start_gateway(settings) as gateway:
            with device(*broker) as sim:
                sim.publish_all(
                    [
                        (f"devices/{dev}/telemetry", orjson.dumps({"temperature": t}))
                        for t in (21, 25, 29)
                    ]
                    + [(f"devices/{quiet}/telemetry", orjson.dumps({"temperature": 5}))]
                )

            async def alerted() -> list[dict[str, Any]]:
                rows = await _rows(gateway, select(alerts))
                total = sum(row["output"]["n"] for row in rows)
                return rows if total == 3 else []

            await wait_until(alerted, what="window alert rows for every message")
            rows = await _rows(gateway, select(alerts))
            assert {row["device_id"] for row in rows} == {dev}  # the quiet one's avg is 5
            for row in rows:
                output = row["output"]
                assert row["rule_id"] == "avg-temp" and output["device_id"] == dev
                assert output["window_end"] - output["window_start"] == 1
                assert output["avg_t"] > 20 and output["hi"] <= 29
            await wait_until(lambda: len(listener.messages) == len(rows), what="publishes")
            document = listener.messages[0][1]
            assert document["output"]["n"] >= 1 and document["rule_id"] == "avg-temp"
    finally:
        listener.close()


async def test_reloads_under_load_lose_nothing_and_evaluate_each_event_once(
    tmp_path: Path, serve_gateway: Any
) -> None:
    if not mosquitto_available():
        pytest.skip("needs mosquitto on PATH for a broker that queues more than 1000 messages")
    # A private broker: the shared one keeps Mosquitto's default max_queued_messages (1000)
    # and drops QoS 1 messages beyond it while the gateway is busy reloading.
    private = PrivateMosquitto()
    private.start()
    broker = ("127.0.0.1", private.port)
    dev = unique("dev")
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "all.toml").write_text(
        '[[rules]]\nid = "every"\ntopic = "devices/+/telemetry"\nwhen = "seq >= 0"\n'
        'actions = [{ type = "alert", severity = "info" }]\n'
    )
    settings = make_settings(tmp_path, broker, device_ids=[dev], database={"batch_size": 50})
    total = 1500
    try:
        async with (
            serve_gateway(settings) as (gateway, server),
            httpx.AsyncClient(
                base_url=f"{server.url}/api/v1", timeout=60
            ) as api,
        ):
            actions = gateway.pipeline.actions
            runtimes_before = gateway.bus.subscriber_count(), actions.handler_count
            messages: list[tuple[str, bytes | str]] = [
                (f"devices/{dev}/telemetry", orjson.dumps({"seq": i})) for i in range(total)
            ]
            publishing = asyncio.create_task(asyncio.to_thread(_publish_all, broker, messages))
            versions = set()
            while not publishing.done():
                report = (await api.post("/rules/reload")).json()
                assert report["result"] == "ok"
                versions.add(report["version"])
            await publishing

            async def all_alerted() -> bool:
                return len(await _rows(gateway, select(alerts))) >= total

            await wait_until(all_alerted, timeout=60, what="an alert per event")
            rows = await _rows(gateway, select(alerts.c.event_id))
            assert len(rows) == total, "each event evaluated exactly once across reloads"
            assert len({row["event_id"] for row in rows}) == total
            assert len(versions) > 1, "reloads happened while events flowed"
            after = gateway.bus.subscriber_count(), actions.handler_count
            assert after == runtimes_before
    finally:
        private.cleanup()


def _publish_all(broker: tuple[str, int], messages: list[tuple[str, bytes | str]]) -> None:
    with device(*broker) as sim:
        sim.publish_all(messages)


async def test_a_backlog_of_publishing_matches_publishes_every_one(
    tmp_path: Path, mosquitto: PrivateMosquitto, start_gateway: Any
) -> None:
    """A replayed backlog makes a publish rule fire far more QoS 1 publishes than the
    broker's Receive Maximum (Mosquitto: 20) at once: each must still go out, none refused."""
    dev = unique("dev")
    broker = ("127.0.0.1", mosquitto.port)
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "echo.toml").write_text(
        '[[rules]]\nid = "echo"\ntopic = "devices/+/telemetry"\nwhen = "seq >= 0"\n'
        'actions = [{ type = "publish", topic = "echo/{device_id}", qos = 1,'
        ' payload = { seq = "{payload.seq}" } }]\n'
    )
    settings = make_settings(tmp_path, broker, device_ids=[dev], mqtt={"client_id": unique("gw")})
    total = 400
    async with start_gateway(settings):  # creates the persistent session, then stops
        pass
    with device(*broker) as sim:
        sim.publish_all(
            [(f"devices/{dev}/telemetry", orjson.dumps({"seq": i})) for i in range(total)]
        )
    listener = Listener(broker, f"echo/{dev}")
    try:
        async with start_gateway(settings):
            await wait_until(
                lambda: len(listener.messages) >= total, timeout=60, what="every echo published"
            )
        assert sorted(int(m["seq"]) for _, m in listener.messages) == list(range(total))
    finally:
        listener.close()
