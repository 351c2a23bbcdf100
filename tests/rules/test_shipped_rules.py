"""Each shipped rule in rules/*.toml, matching and not matching, through the real engine."""

from __future__ import annotations

from typing import Any

import pytest

from flux.rules import Rule, RuleEngine, validate_rules
from flux.rules.testing import TimedEvent

from .conftest import RULES_DIR, make_event


def test_shipped_rules_validate() -> None:
    report = validate_rules(RULES_DIR, known_plugins=set())
    assert report.ok, report.to_dict()
    assert len(report.valid) >= 5


@pytest.mark.parametrize(
    ("rule_id", "payload", "topic", "matched"),
    [
        ("overheat", {"temperature": 31, "humidity": 50}, None, True),
        ("overheat", {"temperature": 31, "humidity": 70}, None, False),
        ("overheat", {"temperature": 25, "humidity": 50}, None, False),
        ("overheat", {"humidity": 50}, None, False),
        ("telemetry-missing-fields", {"temperature": 20}, None, True),
        ("telemetry-missing-fields", {"temperature": 20, "humidity": None}, None, True),
        ("telemetry-missing-fields", {"temperature": 20, "humidity": 40}, None, False),
        ("battery-low", {"battery": 9}, None, True),
        ("battery-low", {"battery": 9, "charging": True}, None, False),
        ("battery-low", {"battery": 80}, None, False),
        ("battery-low", {"battery": "low"}, None, False),
        ("geofence-depot", {"location": {"lat": 52.0, "lon": 4.9}}, "devices/t1/location", True),
        ("geofence-depot", {"location": {"lat": 52.37, "lon": 4.90}}, "devices/t1/location", False),
        ("geofence-depot", {"location": "unknown"}, "devices/t1/location", False),
    ],
)
async def test_rule_matches_or_not(
    engine: RuleEngine,
    shipped_rules: dict[str, Rule],
    rule_id: str,
    payload: dict[str, Any],
    topic: str | None,
    matched: bool,
) -> None:
    result = await engine.test_rule(shipped_rules[rule_id], payload, topic)
    assert result.error is None
    assert result.matched is matched


async def test_hot_average_matches_a_hot_minute_of_three_readings(
    engine: RuleEngine, shipped_rules: dict[str, Rule]
) -> None:
    rule = shipped_rules["hot-average"]
    start = 1_700_000_040.0
    hot = [
        TimedEvent({"temperature": t, "humidity": 50}, start + i, "d1")
        for i, t in enumerate([30.5, 31.0, 31.5])
    ]
    warm = [TimedEvent({"temperature": 31.0}, start + i, "d2") for i in range(2)]  # too few
    cool = [TimedEvent({"temperature": t}, start + i, "d3") for i, t in enumerate([29, 30, 31])]
    result = await engine.test_window_rule(rule, [*hot, *warm, *cool], close_open=True)
    assert result.error is None
    matched = {w.output["device_id"]: w.matched for w in result.windows}
    assert matched == {"d1": True, "d2": False, "d3": False}
    [d1] = [w.output for w in result.windows if w.matched]
    assert d1["avg_t"] == 31.0 and d1["max_t"] == 31.5 and d1["min_h"] == 50 and d1["n"] == 3


async def test_geofence_outputs_distance(
    engine: RuleEngine, shipped_rules: dict[str, Rule]
) -> None:
    result = await engine.test_rule(
        shipped_rules["geofence-depot"], {"location": {"lat": 52.0, "lon": 4.9}}
    )
    assert result.output is not None
    assert result.output["radius_m"] == 5000
    assert 40_000 < result.output["distance_m"] < 42_000


async def test_rate_of_change_uses_a_reference_reading_per_device(
    engine: RuleEngine, shipped_rules: dict[str, Rule]
) -> None:
    await engine.reload(list(shipped_rules.values()))
    rising = "temperature-rising-fast"

    def ev(device: str, temperature: float, at: float, ts: float | None = None) -> Any:
        payload: dict[str, Any] = {"temperature": temperature, "humidity": 40}
        if ts is not None:
            payload["ts"] = ts
        return make_event(payload, f"devices/{device}/telemetry", received_at=at)

    batch = [
        ev("a", 20.0, 1000.0),  # first reading of a: the reference
        ev("b", 30.0, 1000.0),  # first reading of b
        ev("a", 21.0, 1060.0),  # +1 C/min: no
        ev("b", 35.0, 1060.0),  # +5 C/min: yes
        ev("a", 25.0, 1090.0),  # +8 C/min: yes
        ev("b", 45.0, 1061.0),  # 1 s after the reference: too close for a rate
    ]
    matches = [m for m in await engine.evaluate_batch(batch) if m.rule.id == rising]
    assert [(m.event.device_id, m.event.payload["temperature"]) for m in matches] == [
        ("b", 35.0),
        ("a", 25.0),
    ]
    assert matches[0].output == {
        "per_minute": 5.0,
        "previous": 30.0,
        "current": 35.0,
        "over_s": 60.0,
    }
    # The state survives across batches (and a reload of the same rules).
    await engine.reload(list(shipped_rules.values()))
    later = await engine.evaluate_batch([ev("b", 40.0, 1120.0)])
    assert [m.rule.id for m in later if m.rule.id == rising] == [rising]


async def test_rate_of_change_of_a_replayed_backlog_uses_the_device_clock(
    engine: RuleEngine, shipped_rules: dict[str, Rule]
) -> None:
    """Readings queued during an outage arrive milliseconds apart: only ``ts`` says how far
    apart they were taken."""
    await engine.reload(list(shipped_rules.values()))
    rising = "temperature-rising-fast"
    arrivals = [2000.0 + i / 1000 for i in range(6)]

    def readings(device: str, temperatures: list[float], with_ts: bool) -> list[Any]:
        return [
            make_event(
                {"temperature": t, **({"ts": 1000.0 + 30 * i} if with_ts else {})},
                f"devices/{device}/telemetry",
                received_at=arrivals[i],
            )
            for i, t in enumerate(temperatures)
        ]

    slow = [20.0, 20.1, 20.3, 20.2, 20.4, 20.5]  # well under 2 C/min
    fast = [20.0, 22.0, 24.0, 26.0, 28.0, 30.0]  # 4 C/min
    batch = (
        readings("slow-ts", slow, True)
        + readings("slow-no-ts", slow, False)
        + readings("fast-ts", fast, True)
    )
    matches = [m for m in await engine.evaluate_batch(batch) if m.rule.id == rising]
    assert {m.event.device_id for m in matches} == {"fast-ts"}
    assert len(matches) == 5
