"""The tuning report's advice as pure functions of two snapshots and the settings in force."""

from __future__ import annotations

from typing import Any

from flux.snapshot import MetricsSnapshot, Window
from flux.tuning import PluginSettings, SinkSettings, TuningInputs, format_report, tuning_report

WINDOW_S = 100.0


def snap(at: float, *series: tuple[str, float, dict[str, str]]) -> MetricsSnapshot:
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for name, value, labels in series:
        key = tuple(sorted(labels.items()))
        samples.setdefault(name, {})[key] = samples.get(name, {}).get(key, 0.0) + value
    return MetricsSnapshot(at=at, samples=samples)


def s(name: str, value: float, **labels: str) -> tuple[str, float, dict[str, str]]:
    return (name, value, labels)


def bus(capacity: int, *, depth: float = 0, blocked: float = 0) -> list[Any]:
    return [
        s("flux_eventbus_capacity", capacity, subscriber="store"),
        s("flux_eventbus_capacity", capacity, subscriber="pipeline"),
        s("flux_eventbus_depth", depth, subscriber="pipeline"),
        s("flux_eventbus_depth", 0, subscriber="store"),
        s("flux_eventbus_blocked_total", blocked, subscriber="pipeline"),
    ]


def plugin(name: str, **overrides: Any) -> PluginSettings:
    values: dict[str, Any] = {
        "name": name,
        "pool_size": 4,
        "executor": "inline",
        "acquire_timeout_ms": 1000,
        "after_executions": 10_000,
        "memory_high_water_bytes": 1 << 20,
    }
    values.update(overrides)
    return PluginSettings(**values)


def inputs(**overrides: Any) -> TuningInputs:
    values: dict[str, Any] = {
        "eventbus_capacity": 1024,
        "batch_size": 500,
        "pipeline_batch": 256,
        "plugins": {},
    }
    values.update(overrides)
    return TuningInputs(**values)


def report(
    before: list[Any], after: list[Any], settings: TuningInputs, middle: list[Any] | None = None
) -> dict[str, Any]:
    first, last = snap(0.0, *before), snap(WINDOW_S, *after)
    samples = [first, *([snap(WINDOW_S / 2, *middle)] if middle else []), last]
    return tuning_report(Window(first, last), samples, settings)


def settings_named(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["setting"]: entry for entry in result["advice"]}


def test_a_quiet_gateway_gets_no_advice() -> None:
    result = report(bus(1024), bus(1024, depth=3), inputs())
    assert result["advice"] == []
    assert result["window_s"] == WINDOW_S
    assert result["stages"]["bus"]["subscribers"]["pipeline"]["max_fill"] < 0.01
    assert "no advice" in format_report(result)


def test_blocked_senders_ask_for_a_larger_capacity() -> None:
    result = report(bus(64), bus(64, blocked=120), inputs(eventbus_capacity=64))
    advice = settings_named(result)["eventbus.capacity"]
    assert advice["current"] == 64 and advice["suggested"] == 1000  # 2 x the store's batch
    assert "pipeline: 120 senders waited for room" in advice["reason"]
    assert "its queue holds 64, so its batches never fill" in advice["reason"]
    assert "flux run --workers" not in settings_named(result)  # no stage was saturated


def test_a_queue_seen_nearly_full_asks_for_capacity_too() -> None:
    result = report(
        bus(4096), bus(4096), inputs(eventbus_capacity=4096), middle=bus(4096, depth=3900)
    )
    advice = settings_named(result)["eventbus.capacity"]
    assert advice["suggested"] == 4096 * 4
    assert "queue up to 3900 of 4096" in advice["reason"]


def test_a_saturated_stage_behind_a_full_queue_asks_for_workers() -> None:
    busy = [s("flux_rule_eval_seconds_sum", 0.9 * WINDOW_S), s("flux_rule_eval_seconds_count", 50)]
    result = report(bus(1024), [*bus(1024, blocked=10), *busy], inputs())
    named = settings_named(result)
    assert "the pipeline was busy 90%" in named["flux run --workers"]["reason"]
    assert "does not make a saturated stage faster" in named["eventbus.capacity"]["reason"]
    assert result["stages"]["pipeline"]["busy"] == 0.9


def store(commits: float, events: float, commit_s: float, slow: bool = False) -> list[Any]:
    le = "2.5" if slow else "0.005"
    return [
        s("flux_db_batch_size_count", commits),
        s("flux_db_batch_size_sum", events),
        s("flux_db_query_duration_seconds_sum", commit_s, operation="write_batch"),
        s("flux_db_query_duration_seconds_count", commits, operation="write_batch"),
        s("flux_db_query_duration_seconds_bucket", 0, operation="write_batch", le="0.001"),
        s("flux_db_query_duration_seconds_bucket", commits, operation="write_batch", le=le),
        s("flux_db_query_duration_seconds_bucket", commits, operation="write_batch", le="+Inf"),
    ]


def test_full_batches_on_a_busy_store_ask_for_larger_batches() -> None:
    result = report(bus(1024), [*bus(1024), *store(20_000, 20_000, 60.0)], inputs(batch_size=1))
    advice = settings_named(result)["database.batch_size"]
    assert advice["current"] == 1 and advice["suggested"] == 100
    assert "20000 commits of 1 events on average (100% of batch_size 1)" in advice["reason"]
    assert "the store busy 60%" in advice["reason"]


def test_full_batches_on_an_idle_store_or_part_filled_batches_need_nothing() -> None:
    idle = report(bus(1024), [*bus(1024), *store(100, 100, 1.0)], inputs(batch_size=1))
    part = report(bus(1024), [*bus(1024), *store(20_000, 200_000, 60.0)], inputs())
    assert "database.batch_size" not in settings_named(idle)
    assert "database.batch_size" not in settings_named(part)
    assert part["stages"]["store"]["batch_fill"] == 0.02


def test_slow_commits_of_full_batches_ask_for_smaller_batches() -> None:
    result = report(bus(1024), [*bus(1024), *store(50, 25_000, 90.0, slow=True)], inputs())
    advice = settings_named(result)["database.batch_size"]
    assert advice["suggested"] == 250
    assert "commits this slow" in advice["reason"]


def pool(
    name: str,
    *,
    hits: float,
    misses: float = 0,
    waits: float = 0,
    exhausted: float = 0,
    seconds: float = 0.1,
) -> list[Any]:
    return [
        s("flux_plugin_pool_hits_total", hits, plugin=name),
        s("flux_plugin_pool_misses_total", misses, plugin=name),
        s("flux_plugin_pool_waits_total", waits, plugin=name),
        s("flux_plugin_pool_exhausted_total", exhausted, plugin=name),
        s("flux_plugin_call_seconds_count", hits + misses, plugin=name),
        s("flux_plugin_call_seconds_sum", seconds, plugin=name),
    ]


def test_an_exhausted_pool_asks_for_more_instances() -> None:
    settings = inputs(plugins={"echo": plugin("echo", pool_size=1, acquire_timeout_ms=0)})
    after = [*bus(1024), *pool("echo", hits=20, misses=1, waits=19, exhausted=19)]
    result = report(bus(1024), after, settings)
    advice = settings_named(result)["plugin.echo.pool.size"]
    assert advice["current"] == 1 and advice["suggested"] == 2
    assert "19 calls gave up after waiting 0 ms for one of its 1 instances" in advice["reason"]


def test_frequent_waits_ask_for_more_instances_and_a_healthy_pool_for_nothing() -> None:
    settings = inputs(plugins={"a": plugin("a"), "b": plugin("b")})
    after = [*bus(1024), *pool("a", hits=1000, waits=100), *pool("b", hits=1000, waits=10)]
    named = settings_named(report(bus(1024), after, settings))
    assert named["plugin.a.pool.size"]["suggested"] == 8
    assert "100 of 1000 calls waited" in named["plugin.a.pool.size"]["reason"]
    assert "plugin.b.pool.size" not in named


def test_an_inline_plugin_taking_the_loop_asks_for_a_thread() -> None:
    threaded = plugin("threaded", executor="thread")
    settings = inputs(plugins={"heavy": plugin("heavy"), "threaded": threaded})
    after = [
        *bus(1024),
        *pool("heavy", hits=1000, seconds=30.0),
        *pool("threaded", hits=1000, seconds=30.0),
    ]
    result = report(bus(1024), after, settings)
    named = settings_named(result)
    assert named["plugin.heavy.pool.executor"]["suggested"] == "thread"
    assert "30% of the last 100 s (30.0 ms each)" in named["plugin.heavy.pool.executor"]["reason"]
    assert "plugin.threaded.pool.executor" not in named
    assert list(result["stages"]["plugins"]) == ["heavy", "threaded"]  # most expensive first


def test_memory_recycles_ask_to_recycle_by_count_sooner() -> None:
    settings = inputs(plugins={"leaky": plugin("leaky", memory_high_water_bytes=65536)})
    before = [*bus(1024), s("flux_plugin_memory_bytes", 70000, plugin="leaky")]
    after = [
        *bus(1024),
        *pool("leaky", hits=1000),
        s("flux_plugin_recycles_total", 4, plugin="leaky", reason="memory"),
        s("flux_plugin_memory_bytes", 120000, plugin="leaky"),
    ]
    named = settings_named(report(before, after, settings))
    advice = named["plugin.leaky.recycle.after_executions"]
    assert advice["current"] == 10_000 and advice["suggested"] == 200  # 0.8 x 1000 / 4
    assert "4 instances reached the memory mark of 65536 bytes in 1000 calls" in advice["reason"]
    assert "grown 50000 in the window" in advice["reason"]


def test_a_rule_stopped_at_its_limits_is_named() -> None:
    after = [
        *bus(1024),
        s("flux_rule_evaluations_total", 500, rule="fine"),
        s("flux_rule_evaluations_total", 5, rule="slow"),
        s("flux_rule_errors_total", 5, rule="slow", kind="timeout"),
        s("flux_rule_errors_total", 2, rule="typo", kind="runtime"),
    ]
    result = report(bus(1024), after, inputs())
    named = settings_named(result)
    assert "rule.slow" in named and "rule.typo" not in named and "rule.fine" not in named
    assert named["rule.slow"]["current"].startswith("5 evaluations stopped at a limit")
    ranked = [rule["rule"] for rule in result["stages"]["rules"]["by_rule"]]
    assert ranked == ["slow", "typo", "fine"]
    assert "* rule.slow:" in format_report(result)


def sink(name: str, **overrides: Any) -> SinkSettings:
    values: dict[str, Any] = {
        "name": name,
        "type": "mqtt",
        "url": "mqtts://cloud.example:8883",
        "max_backlog_mb": 1.0,
        "batch_size": 500,
        "overflow": "block",
    }
    values.update(overrides)
    return SinkSettings(**values)


def sink_series(name: str, *, backlog: float, sent: float, **more: float) -> list[Any]:
    series = [
        s("flux_sink_backlog", backlog, sink=name),
        s("flux_sink_backlog_bytes", more.get("bytes", backlog * 100), sink=name),
        s("flux_sink_oldest_age_seconds", more.get("age", 0), sink=name),
        s("flux_sink_sent_total", sent, sink=name),
        s("flux_sink_connected", more.get("connected", 1), sink=name),
    ]
    if "failures" in more:
        series.append(s("flux_sink_failures_total", more["failures"], sink=name, reason="connect"))
    if "dropped" in more:
        series.append(
            s("flux_sink_dropped_total", more["dropped"], sink=name, reason="drop_oldest")
        )
    return series


def test_a_sink_near_its_bound_or_dropping_asks_for_a_larger_backlog() -> None:
    settings = inputs(sinks={"full": sink("full"), "drops": sink("drops", overflow="drop_oldest")})
    before = [*sink_series("full", backlog=0, sent=0), *sink_series("drops", backlog=0, sent=0)]
    after = [
        *sink_series("full", backlog=9000, sent=100, bytes=900_000),
        *sink_series("drops", backlog=10, sent=100, dropped=42),
    ]
    named = settings_named(report(before, after, settings))
    full, drops = named["sinks.full.max_backlog_mb"], named["sinks.drops.max_backlog_mb"]
    assert (full["current"], full["suggested"]) == (1.0, 2.0)
    assert "86% of max_backlog_mb" in full["reason"] and "unacknowledged" in full["reason"]
    assert "42 rows were dropped" in drops["reason"] and "deleted unsent" in drops["reason"]


def test_a_sink_that_reaches_nothing_names_its_url_and_one_that_catches_up_nothing() -> None:
    settings = inputs(sinks={"cloud": sink("cloud"), "fine": sink("fine")})
    before = [*sink_series("cloud", backlog=0, sent=0), *sink_series("fine", backlog=50, sent=0)]
    after = [
        *sink_series("cloud", backlog=300, sent=0, connected=0, failures=12, age=95),
        *sink_series("fine", backlog=0, sent=5000),
    ]
    result = report(before, after, settings)
    named = settings_named(result)
    assert set(named) == {"sinks.cloud.url"}
    assert named["sinks.cloud.url"]["current"] == "mqtts://cloud.example:8883"
    assert (
        "failures: connect 12; 300 rows wait, the oldest for 95 s"
        in named["sinks.cloud.url"]["reason"]
    )
    assert result["stages"]["sinks"]["fine"]["sent_per_s"] == 50
    assert (
        "sink      cloud: 300 rows waiting (oldest 95 s), sent 0.0/s, NOT connected"
        in format_report(result)
    )


def test_an_http_sink_sending_slower_than_rows_arrive_asks_for_larger_batches() -> None:
    settings = inputs(sinks={"ingest": sink("ingest", type="http", batch_size=1)})
    before = sink_series("ingest", backlog=0, sent=0)
    after = sink_series("ingest", backlog=2000, sent=1000)
    named = settings_named(report(before, after, settings))
    batch = named["sinks.ingest.batch_size"]
    assert (batch["current"], batch["suggested"]) == (1, 4)
    assert "rows arrive at 30.0/s and are sent at 10.0/s" in batch["reason"]
    # An MQTT sink pipelines: its batch size is not the advice there.
    mqtt = inputs(sinks={"ingest": sink("ingest", batch_size=1)})
    assert settings_named(report(before, after, mqtt)) == {}
