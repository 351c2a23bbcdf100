"""The in-process sampler: chart points from snapshots, a bounded history, live gauges."""

from __future__ import annotations

import pytest

from flux.sampler import MetricsSampler, chart_point
from flux.snapshot import MetricsSnapshot
from tests.harness import wait_until


def snapshot(at: float, **values: dict[tuple[tuple[str, str], ...], float]) -> MetricsSnapshot:
    return MetricsSnapshot(at=at, samples=values)


def test_a_chart_point_has_rates_over_the_interval_and_gauges_at_its_end() -> None:
    before = snapshot(
        10.0,
        flux_events_published_total={(("source", "mqtt"),): 100, (("source", "derived"),): 50},
        flux_db_batch_size_sum={(): 150},
        flux_rule_matches_total={(("rule", "hot"),): 5},
    )
    after = snapshot(
        12.0,
        flux_events_published_total={
            (("source", "mqtt"),): 300,
            (("source", "http"),): 20,
            (("source", "derived"),): 250,
        },
        flux_db_batch_size_sum={(): 570},
        flux_rule_matches_total={(("rule", "hot"),): 9, (("rule", "cold"),): 0},
        flux_dead_letters_total={(("reason", "invalid_json"),): 4},
        flux_eventbus_depth={(("subscriber", "store"),): 3, (("subscriber", "pipeline"),): 7},
        flux_eventbus_capacity={
            (("subscriber", "store"),): 1024,
            (("subscriber", "pipeline"),): 1024,
        },
        flux_event_commit_latency_seconds_bucket={
            (("le", "0.001"),): 0,
            (("le", "0.01"),): 220,
            (("le", "+Inf"),): 220,
        },
    )
    point = chart_point(before, after)
    assert point["t"] == 12.0 and point["seconds"] == 2.0
    assert point["events_in"] == (200 + 20) / 2  # derived events are not received
    assert point["stored"] == 420 / 2
    assert point["matches"] == {"hot": 2.0}  # a rule that did not match is left out
    assert point["dead_letters"] == {"invalid_json": 2.0}
    assert point["bus_depth"] == {"store": 3, "pipeline": 7}
    assert point["bus_capacity"] == 1024
    assert point["latency_p50"] == pytest.approx(0.001 + 0.009 * 0.5)
    assert chart_point(after, after)["latency_p99"] is None  # nothing committed


async def test_the_sampler_keeps_a_bounded_history_and_refreshes_gauges_first() -> None:
    refreshed: list[int] = []
    sampler = MetricsSampler(
        interval_s=0.02, history_s=0.06, before_sample=[lambda: refreshed.append(1)]
    )
    async with sampler:
        assert len(sampler.history()) == 1 and sampler.points() == []  # one sample at start
        await wait_until(lambda: len(refreshed) >= 8, timeout=10, what="eight samples")
    taken = len(refreshed)
    history = sampler.history()
    points = sampler.points()
    assert len(history) == 4  # history_s / interval_s + 1
    assert len(points) == 4 and [p["t"] for p in points] == [round(s.at, 3) for s in history]
    assert sampler.points(since=points[1]["t"]) == points[2:]
    async with sampler:  # started again after it stopped
        pass
    assert len(refreshed) == taken + 1
    window, samples = sampler.window()
    assert samples[-1] is window.after and window.before is samples[0]
