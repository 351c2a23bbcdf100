"""The shipped ``config.toml``, ``rules/`` and ``plugins/`` against a realistic backlog.

The configuration file is loaded as it ships; only what must differ on a test machine comes
from ``FLUX_*`` overrides, as an operator would set it (broker, client id, database file,
ports, module cache, and the absolute rules and plugins folders). A fleet of 200 sensors
(``tests.harness.FleetDevice``: drifting temperatures, humidity, battery in percent, the
device's own ``ts``) queues 3,000 QoS 1 readings while the gateway is down; the gateway
then drains them. Pass: no dead letter, every reading stored once and enriched once, the
batch statistics account for every reading, and each shipped rule raised exactly the
alerts (and publishes) its condition gives for these readings.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import select

from flux.config import Settings, load_settings
from flux.rules.state import StateRow, fingerprint
from flux.store.rule_state import load_rule_state, write_rule_state
from flux.store.schema import alerts, dead_letters, devices, events
from tests.harness import (
    Db,
    Device,
    Listener,
    PrivateMosquitto,
    fleet,
    fleet_messages,
    make_settings,
    unique,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 200
PER_DEVICE = 15
TOTAL = DEVICES * PER_DEVICE


def shipped_settings(tmp_path: Path, broker_port: int, client_id: str) -> Settings:
    return load_settings(
        ROOT / "config.toml",
        environ={
            "FLUX_MQTT__URL": f"mqtt://127.0.0.1:{broker_port}",
            "FLUX_MQTT__CLIENT_ID": client_id,
            "FLUX_MQTT__EMBEDDED": "off",
            "FLUX_DATABASE__URL": f"sqlite+aiosqlite:///{tmp_path}/flux.db",
            "FLUX_SERVER__PORT": "0",
            "FLUX_METRICS__PORT": "0",
            "FLUX_RULES__DIR": str(ROOT / "rules"),
            "FLUX_PLUGINS__DIR": str(ROOT / "plugins"),
            "FLUX_PLUGINS__CACHE_DIR": str(tmp_path / "modules"),
        },
    )


def expected_alerts(readings: list[tuple[str, dict[str, Any]]]) -> Counter[str]:
    """What each shipped telemetry rule's condition gives for ``readings`` (in order)."""
    expected: Counter[str] = Counter()
    reference: dict[str, tuple[float, float]] = {}
    for topic, p in readings:
        if p["temperature"] > 30 and p["humidity"] < 60:
            expected["overheat"] += 1
        if p["battery"] < 15 and not p["charging"]:
            expected["battery-low"] += 1
        previous = reference.get(topic)
        if previous is None:
            reference[topic] = (p["temperature"], p["ts"])
            continue
        elapsed = p["ts"] - previous[1]
        if elapsed >= 10:
            reference[topic] = (p["temperature"], p["ts"])
            if (p["temperature"] - previous[0]) / elapsed * 60 > 2:
                expected["temperature-rising-fast"] += 1
    return expected


def published_rules(listener: Listener) -> Counter[str]:
    """The rules behind what the gateway published: alerts/<device>/<rule>, and
    maintenance/<device>/battery for battery-low."""
    rules = (topic.split("/")[-1] for topic, _ in listener.received())
    return Counter("battery-low" if rule == "battery" else rule for rule in rules)


async def test_the_shipped_configuration_drains_a_fleet_backlog(
    tmp_path: Path, mosquitto: PrivateMosquitto, start_gateway: Any
) -> None:
    settings = shipped_settings(tmp_path, mosquitto.port, unique("flux-shipped-"))
    readings = fleet_messages(fleet(DEVICES, PER_DEVICE), PER_DEVICE)
    expected = expected_alerts(readings)
    assert expected["overheat"] and expected["battery-low"] and expected["temperature-rising-fast"]
    matching = sum(
        1
        for _, p in readings
        if (p["temperature"] > 30 and p["humidity"] < 60) or p["battery"] < 15
    )
    assert 0.05 < matching / TOTAL < 0.2, "about 1 reading in 10 trips a rule"

    db = Db(settings.database.url)
    listener = Listener(("127.0.0.1", mosquitto.port), "alerts/#", "maintenance/#")
    try:
        async with start_gateway(settings):
            pass  # the persistent session and its subscription exist from now on
        device = Device("127.0.0.1", mosquitto.port)
        try:
            device.publish_all([(topic, orjson.dumps(p)) for topic, p in readings], timeout=120)
        finally:
            device.close()

        async with start_gateway(settings):
            await wait_until(
                lambda: _stored(db, TOTAL), timeout=120, what="every reading stored and enriched"
            )
            await wait_until(
                lambda: published_rules(listener) == expected,
                timeout=60,
                what=f"the publishes of every alert ({expected})",
            )
        async with db.engine.connect() as conn:
            letters = (await conn.execute(select(dead_letters.c.reason))).all()
            rows = (
                await conn.execute(select(events.c.topic, events.c.device_id, events.c.payload))
            ).all()
            alert_rows = (await conn.execute(select(alerts.c.rule_id, alerts.c.device_id))).all()
            counts = [r[0] for r in await conn.execute(select(devices.c.message_count))]
    finally:
        listener.close()
        await db.close()

    assert letters == [], f"valid telemetry must not be dead-lettered: {letters[:3]}"
    by_kind: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for topic, device_id, payload in rows:
        by_kind.setdefault(topic.rsplit("/", 1)[-1], []).append((device_id, payload))
    sent = Counter((topic.split("/")[1], p["seq"]) for topic, p in readings)
    assert Counter((d, p["seq"]) for d, p in by_kind["telemetry"]) == sent
    enriched = by_kind["enriched"]
    assert Counter((d, p["seq"]) for d, p in enriched) == sent, "each reading enriched once"
    assert all("temperature_f" in p and "dew_point" in p for _, p in enriched)
    stats = [p for _, p in by_kind["stats"]]
    assert sum(p["count"] for p in stats) == TOTAL, "the statistics cover every reading once"
    assert {p["device_id"] for p in stats} == {d.device_id for d in fleet(DEVICES, 1)}
    # The window rule alerts once a minute is over, so only if one ended during the test.
    alert_rules = Counter(rule for rule, _ in alert_rows if rule != "hot-average")
    assert alert_rules == expected
    hot = {d.device_id for d in fleet(DEVICES, 1) if d.hot}
    assert {device for rule, device in alert_rows if rule == "hot-average"} <= hot
    assert sorted(counts) == [PER_DEVICE] * DEVICES


async def _stored(db: Db, total: int) -> bool:
    """Whether ``total`` telemetry readings and as many enriched ones are stored."""
    async with db.engine.connect() as conn:
        for kind in ("telemetry", "enriched"):
            rows = await conn.execute(select(events.c.id).where(events.c.topic.like(f"%/{kind}")))
            if len(rows.all()) < total:
                return False
    return True


COUNTING_RULE = '''
[[rules]]
id = "counting"
topic = "devices/+/telemetry"
script = """
state.n = (state.n or 0) + 1
return false
"""
'''


async def test_a_rule_file_that_fails_to_load_keeps_its_rules_stored_state(
    tmp_path: Path, broker: tuple[str, int], start_gateway: Any
) -> None:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    rule_file = rules_dir / "counting.toml"
    rule_file.write_text(COUNTING_RULE)
    settings = make_settings(tmp_path, broker)
    async with start_gateway(settings) as gateway:
        status = gateway.rules.status("counting")
        assert status is not None and status.rule is not None
        stored = StateRow("counting", "script", "d1", fingerprint(status.rule), {"n": 7}, 1)
        async with gateway.engine.begin() as conn:
            await write_rule_state(conn, [stored])

    rule_file.write_text(COUNTING_RULE + "\n[[rules]\n")  # a typo: the file does not load
    async with start_gateway(settings) as gateway:
        assert gateway.rules.status("counting") is None
        assert await load_rule_state(gateway.engine) == [stored]

    rule_file.unlink()  # the rule deleted for good, and every rule loads
    async with start_gateway(settings) as gateway:
        assert await load_rule_state(gateway.engine) == []
