"""The tuning report: per-stage utilisation and advice, from a window of the gateway's metrics.

Pure functions over two ``MetricsSnapshot`` (the start and the end of the window, plus the
samples in between for peaks) and the settings in force, so each condition is a unit test
away. ``GET /api/v1/report`` and ``flux report`` show the result.

Each advice entry names a ``setting``: a configuration key path (``eventbus.capacity``), a
key of one plugin's ``plugin.toml`` (``plugin.NAME.pool.size``), a rule (``rule.ID``) or the
``flux run --workers`` option; its ``current`` value, a ``suggested`` one, and the figures
behind it (``reason``). "Busy" is the share of the window a stage spent in its own work
(rule evaluation, plugin calls, commits): a floor, since the Python around it is not timed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flux.config import Settings
from flux.plugins import PluginManager
from flux.snapshot import MetricsSnapshot, Window

#: A queue counts as nearly full above this share of its capacity.
NEARLY_FULL = 0.8
#: A stage this busy over the window is saturated: more queue cannot help it.
SATURATED = 0.8
#: Batches this full on average mean events were waiting for the store.
FULL_BATCHES = 0.9
#: A store this busy with full batches gains from larger ones.
BUSY_STORE = 0.5
#: A commit slower than this (p99) makes batches too large for latency.
SLOW_COMMIT_S = 1.0
#: Pool acquisitions that waited, as a share of calls, worth a larger pool.
WAITS_SHARE = 0.05
#: The design's pool hit-ratio floor (the Grafana panel's green threshold).
HIT_RATIO_FLOOR = 0.8
#: Fewer calls than this say nothing about a pool's hit ratio.
MIN_CALLS = 100
#: An inline plugin whose calls take this share of the window holds up the event loop.
BUSY_PLUGIN = 0.2
#: Recycle by count a little before the memory mark is reached.
RECYCLE_MARGIN = 0.8
#: Bounds of the settings the advice may suggest (as validated in ``flux.config``).
MAX_CAPACITY = 1_000_000
MAX_BATCH = 50_000
MAX_POOL = 256
MAX_SINK_BATCH = 10_000
WORKERS_OPTION = "flux run --workers"


@dataclass(frozen=True, slots=True)
class PluginSettings:
    """The settings of one plugin that the report weighs its figures against."""

    name: str
    pool_size: int
    executor: str
    acquire_timeout_ms: int
    after_executions: int
    memory_high_water_bytes: int


@dataclass(frozen=True, slots=True)
class SinkSettings:
    """The settings of one configured sink that the report weighs its figures against."""

    name: str
    type: str
    url: str
    max_backlog_mb: float
    batch_size: int
    overflow: str


@dataclass(frozen=True, slots=True)
class TuningInputs:
    """The settings in force."""

    eventbus_capacity: int
    batch_size: int
    pipeline_batch: int
    plugins: Mapping[str, PluginSettings]
    sinks: Mapping[str, SinkSettings] = field(default_factory=dict)


def inputs_for(settings: Settings, plugins: PluginManager, *, pipeline_batch: int) -> TuningInputs:
    """The ``TuningInputs`` of a running gateway."""
    loaded: dict[str, PluginSettings] = {}
    for name in sorted(plugins.names()):
        manifest = plugins.manifest(name)
        loaded[name] = PluginSettings(
            name=name,
            pool_size=manifest.pool_size(plugins.default_pool_size),
            executor=manifest.pool.executor or plugins.executor_mode,
            acquire_timeout_ms=manifest.pool.acquire_timeout_ms,
            after_executions=manifest.recycle.after_executions,
            memory_high_water_bytes=manifest.memory_high_water_bytes,
        )
    sinks = {
        name: SinkSettings(
            name=name,
            type=sink.type,
            url=sink.url,
            max_backlog_mb=sink.max_backlog_mb,
            batch_size=sink.batch_size,
            overflow=sink.overflow,
        )
        for name, sink in sorted(settings.sinks.items())
        if sink.enabled
    }
    return TuningInputs(
        eventbus_capacity=settings.eventbus.capacity,
        batch_size=settings.database.batch_size,
        pipeline_batch=pipeline_batch,
        plugins=loaded,
        sinks=sinks,
    )


def tuning_report(
    window: Window, samples: Sequence[MetricsSnapshot], inputs: TuningInputs
) -> dict[str, Any]:
    """Utilisation per stage over ``window`` and the advice it leads to.

    ``samples`` are the snapshots taken during the window (for peaks such as the deepest
    queue); the window's own ends are enough for everything else.
    """
    bus = _bus(window, samples, inputs)
    pipeline = _pipeline(window)
    store = _store(window, inputs)
    rules = _rules(window)
    plugins = _plugins(window, inputs)
    sinks = _sinks(window)
    advice = [
        *_capacity_advice(bus, pipeline, store, inputs),
        *_workers_advice(bus, pipeline, store),
        *_batch_advice(store, bus, inputs),
        *_pool_advice(plugins, inputs, window.seconds),
        *_executor_advice(plugins, inputs, window.seconds),
        *_memory_advice(plugins, inputs),
        *_rule_advice(rules),
        *_sink_advice(sinks, inputs),
    ]
    return {
        "window_s": round(window.seconds, 3),
        "stages": {
            "ingest": _ingest(window),
            "bus": bus,
            "pipeline": pipeline,
            "store": store,
            "rules": rules,
            "plugins": plugins,
            "sinks": sinks,
        },
        "advice": advice,
    }


# -- stages -----------------------------------------------------------------------------------


def _ingest(window: Window) -> dict[str, Any]:
    rates = window.rate_by("flux_events_published_total", "source")
    return {
        "events_per_s": {source: _round(rate) for source, rate in sorted(rates.items())},
        "mqtt_connected": window.after.value("flux_mqtt_connected") == 1,
    }


def _bus(
    window: Window, samples: Sequence[MetricsSnapshot], inputs: TuningInputs
) -> dict[str, Any]:
    capacities = window.after.by("flux_eventbus_capacity", "subscriber")
    subscribers: dict[str, Any] = {}
    for name in sorted(capacities):
        capacity = int(capacities[name]) or inputs.eventbus_capacity
        depths = [s.value("flux_eventbus_depth", subscriber=name) for s in (*samples, window.after)]
        deepest = max(depths, default=0.0)
        subscribers[name] = {
            "capacity": capacity,
            "depth": int(window.after.value("flux_eventbus_depth", subscriber=name)),
            "max_depth": int(deepest),
            "max_fill": _round(deepest / capacity),
            "blocked": int(window.increase("flux_eventbus_blocked_total", subscriber=name)),
            "dropped": int(window.increase("flux_eventbus_dropped_total", subscriber=name)),
        }
    return {"capacity": inputs.eventbus_capacity, "subscribers": subscribers}


def _pipeline(window: Window) -> dict[str, Any]:
    rules_s = window.increase("flux_rule_eval_seconds_sum")
    plugins_s = window.increase("flux_plugin_call_seconds_sum")
    return {
        "busy": _round((rules_s + plugins_s) / window.seconds),
        "rules_s": _round(rules_s),
        "plugins_s": _round(plugins_s),
    }


def _store(window: Window, inputs: TuningInputs) -> dict[str, Any]:
    commits = window.increase("flux_db_batch_size_count")
    events = window.increase("flux_db_batch_size_sum")
    mean_batch = events / commits if commits else 0.0
    commit = {"operation": "write_batch"}
    commit_s = window.increase("flux_db_query_duration_seconds_sum", **commit)
    return {
        "busy": _round(commit_s / window.seconds),
        "commits": int(commits),
        "events_per_s": _round(events / window.seconds),
        "batch_size": inputs.batch_size,
        "mean_batch": _round(mean_batch),
        "batch_fill": _round(mean_batch / inputs.batch_size),
        "commit_ms_mean": _ms(window.mean("flux_db_query_duration_seconds", **commit)),
        "commit_ms_p99": _ms(window.quantile(0.99, "flux_db_query_duration_seconds", **commit)),
        "latency_ms_p50": _ms(window.quantile(0.5, "flux_event_commit_latency_seconds")),
        "latency_ms_p99": _ms(window.quantile(0.99, "flux_event_commit_latency_seconds")),
        "connections_active": int(window.after.value("flux_db_connections_active")),
        "connections_idle": int(window.after.value("flux_db_connections_idle")),
    }


def _rules(window: Window) -> dict[str, Any]:
    """Rule cost as a whole, and each rule's evaluations, matches, errors and time (its share
    of the batches' time, ``flux_rule_eval_seconds_total``), the costliest first."""
    evaluations = window.increase_by("flux_rule_evaluations_total", "rule")
    rule_seconds = window.increase_by("flux_rule_eval_seconds_total", "rule")
    matches = window.increase_by("flux_rule_matches_total", "rule")
    errors: dict[str, dict[str, int]] = {}
    for rule in set(window.after.by("flux_rule_errors_total", "rule")):
        kinds = window.increase_by("flux_rule_errors_total", "kind", rule=rule)
        if kinds:
            errors[rule] = {kind: int(count) for kind, count in sorted(kinds.items())}
    seconds = window.increase("flux_rule_eval_seconds_sum")
    total = sum(evaluations.values())
    ranked = sorted(
        set(evaluations) | set(errors),
        key=lambda rule: (
            -sum(errors.get(rule, {}).values()),
            -rule_seconds.get(rule, 0.0),
            -evaluations.get(rule, 0),
            rule,
        ),
    )
    by_rule = [
        {
            "rule": rule,
            "evaluations": int(evaluations.get(rule, 0)),
            "matches": int(matches.get(rule, 0)),
            "errors": errors.get(rule, {}),
            "seconds": _round(rule_seconds.get(rule, 0.0)),
            "busy": _round(rule_seconds.get(rule, 0.0) / window.seconds),
            "us_per_evaluation": (
                _round(rule_seconds.get(rule, 0.0) / evaluations[rule] * 1e6)
                if evaluations.get(rule)
                else None
            ),
        }
        for rule in ranked
    ]
    return {
        "busy": _round(seconds / window.seconds),
        "seconds": _round(seconds),
        "evaluations": int(total),
        "us_per_evaluation": _round(seconds / total * 1e6) if total else None,
        "by_rule": by_rule,
    }


def _sinks(window: Window) -> dict[str, dict[str, Any]]:
    """Each sink's backlog (now, and how it grew), what it sent, and its failures and drops;
    ``arriving_per_s`` is what it sent plus the backlog's growth, per second."""
    after, before = window.after, window.before
    found: dict[str, dict[str, Any]] = {}
    for sink in sorted(after.by("flux_sink_backlog", "sink")):
        backlog = after.value("flux_sink_backlog", sink=sink)
        grown = backlog - before.value("flux_sink_backlog", sink=sink)
        sent = window.increase("flux_sink_sent_total", sink=sink)
        found[sink] = {
            "backlog_rows": int(backlog),
            "backlog_bytes": int(after.value("flux_sink_backlog_bytes", sink=sink)),
            "backlog_growth": int(grown),
            "oldest_age_s": _round(after.value("flux_sink_oldest_age_seconds", sink=sink)),
            "sent": int(sent),
            "sent_per_s": _round(sent / window.seconds),
            "arriving_per_s": _round(max(0.0, sent + grown) / window.seconds),
            "connected": bool(after.value("flux_sink_connected", sink=sink)),
            "failures": {
                reason: int(count)
                for reason, count in sorted(
                    window.increase_by("flux_sink_failures_total", "reason", sink=sink).items()
                )
            },
            "dropped": int(window.increase("flux_sink_dropped_total", sink=sink)),
        }
    return found


def _plugins(window: Window, inputs: TuningInputs) -> dict[str, Any]:
    """Each plugin's calls, time, pool figures and memory, most expensive first."""
    seconds = window.increase_by("flux_plugin_call_seconds_sum", "plugin")
    names = set(inputs.plugins) | set(seconds)
    plugins: dict[str, Any] = {}
    for name in sorted(names, key=lambda n: (-seconds.get(n, 0.0), n)):
        hits = window.increase("flux_plugin_pool_hits_total", plugin=name)
        misses = window.increase("flux_plugin_pool_misses_total", plugin=name)
        calls = window.increase("flux_plugin_call_seconds_count", plugin=name)
        spent = seconds.get(name, 0.0)
        memory_now = window.after.value("flux_plugin_memory_bytes", plugin=name)
        memory_before = window.before.value("flux_plugin_memory_bytes", plugin=name)
        recycles = window.increase_by("flux_plugin_recycles_total", "reason", plugin=name)
        plugins[name] = {
            "calls": int(calls),
            "seconds": _round(spent),
            "busy": _round(spent / window.seconds),
            "mean_call_ms": _ms(spent / calls if calls else None),
            "hits": int(hits),
            "misses": int(misses),
            "hit_ratio": _round(hits / (hits + misses)) if hits + misses else None,
            "waits": int(window.increase("flux_plugin_pool_waits_total", plugin=name)),
            "exhausted": int(window.increase("flux_plugin_pool_exhausted_total", plugin=name)),
            "recycles": {reason: int(n) for reason, n in sorted(recycles.items())},
            "memory_bytes": int(memory_now),
            "memory_growth_bytes": int(memory_now - memory_before) if memory_before else 0,
        }
    return plugins


# -- advice -----------------------------------------------------------------------------------


def _advice(setting: str, current: Any, suggested: Any, reason: str) -> dict[str, Any]:
    return {"setting": setting, "current": current, "suggested": suggested, "reason": reason}


def _saturated(pipeline: Mapping[str, Any], store: Mapping[str, Any]) -> list[str]:
    """The stages busy for most of the window."""
    busy = {"pipeline": pipeline["busy"], "store": store["busy"]}
    return [
        f"the {stage} was busy {share:.0%}" for stage, share in busy.items() if share >= SATURATED
    ]


def _capacity_advice(
    bus: Mapping[str, Any],
    pipeline: Mapping[str, Any],
    store: Mapping[str, Any],
    inputs: TuningInputs,
) -> list[dict[str, Any]]:
    """Queues that filled or made senders wait: a larger ``eventbus.capacity`` absorbs
    bursts (and a capacity below a subscriber's batch caps its batches)."""
    capacity = inputs.eventbus_capacity
    largest_batch = max(inputs.batch_size, inputs.pipeline_batch)
    full = {
        name: sub
        for name, sub in bus["subscribers"].items()
        if sub["blocked"] or sub["max_fill"] >= NEARLY_FULL
    }
    if not full:
        return []
    figures = [
        f"{name}: {sub['blocked']} senders waited for room, queue up to "
        f"{sub['max_depth']} of {sub['capacity']}"
        for name, sub in full.items()
    ]
    if capacity < largest_batch:
        figures.append(
            f"a subscriber takes batches of up to {largest_batch} events but its queue holds "
            f"{capacity}, so its batches never fill"
        )
    saturated = _saturated(pipeline, store)
    if saturated:
        figures.append(
            "; ".join(saturated) + ": a larger queue absorbs bursts but does not make a "
            "saturated stage faster (see the other entries)"
        )
    suggested = min(MAX_CAPACITY, max(capacity * 4, 2 * largest_batch))
    return [_advice("eventbus.capacity", capacity, suggested, "; ".join(figures))]


def _workers_advice(
    bus: Mapping[str, Any], pipeline: Mapping[str, Any], store: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """A stage busy most of the window while its queue backs up: more processes."""
    saturated = _saturated(pipeline, store)
    backed_up = any(
        sub["blocked"] or sub["max_fill"] >= NEARLY_FULL for sub in bus["subscribers"].values()
    )
    if not saturated or not backed_up:
        return []
    return [
        _advice(
            WORKERS_OPTION,
            None,
            "one more worker process, up to one per core",
            "; ".join(saturated) + " of the window while the bus backed up: the load needs "
            "more than this process (workers share the MQTT subscription and the database)",
        )
    ]


def _batch_advice(
    store: Mapping[str, Any], bus: Mapping[str, Any], inputs: TuningInputs
) -> list[dict[str, Any]]:
    """``database.batch_size`` from commit time against batch fill."""
    size = inputs.batch_size
    if not store["commits"]:
        return []
    fill, busy, commit_ms = store["batch_fill"], store["busy"], store["commit_ms_mean"]
    p99_ms = store["commit_ms_p99"]
    figures = (
        f"{store['commits']} commits of {store['mean_batch']:g} events on average "
        f"({fill:.0%} of batch_size {size}), {_num(commit_ms)} ms each (p99 {_num(p99_ms)} ms), "
        f"the store busy {busy:.0%} of the window"
    )
    if p99_ms is not None and p99_ms / 1000 >= SLOW_COMMIT_S and fill >= FULL_BATCHES and size > 1:
        return [
            _advice(
                "database.batch_size",
                size,
                max(1, size // 2),
                figures + ": commits this slow hold every event of the batch that long; "
                "smaller batches commit sooner",
            )
        ]
    queued = bus["subscribers"].get("store", {})
    waiting = queued.get("blocked", 0) or queued.get("max_fill", 0.0) >= NEARLY_FULL
    if fill >= FULL_BATCHES and size < MAX_BATCH and (busy >= BUSY_STORE or waiting):
        return [
            _advice(
                "database.batch_size",
                size,
                min(MAX_BATCH, max(2 * size, 100)),
                figures + ": batches leave full, so events wait for the next commit; a commit "
                "costs about the same whatever it holds, so larger batches store more per "
                "commit",
            )
        ]
    return []


def _pool_advice(
    plugins: Mapping[str, Any], inputs: TuningInputs, seconds: float
) -> list[dict[str, Any]]:
    """A pool too small for its concurrent callers: exhaustion, waits, a low hit ratio."""
    advice = []
    for name, figures in plugins.items():
        settings = inputs.plugins.get(name)
        if settings is None:
            continue
        calls, waits, exhausted = figures["calls"], figures["waits"], figures["exhausted"]
        ratio = figures["hit_ratio"]
        low_ratio = ratio is not None and ratio < HIT_RATIO_FLOOR and calls >= MIN_CALLS
        many_waits = calls and waits / calls >= WAITS_SHARE
        if not (exhausted or many_waits or low_ratio):
            continue
        size = settings.pool_size
        parts = [
            f"{exhausted} calls gave up after waiting {settings.acquire_timeout_ms} ms for "
            f"one of its {size} instances (pool exhausted)"
            if exhausted
            else f"all {size} instances were busy",
            f"{waits} of {calls} calls waited",
        ]
        if ratio is not None:
            parts.append(f"hit ratio {ratio:.0%} (want >= {HIT_RATIO_FLOOR:.0%})")
        parts.append(f"in the last {seconds:.0f} s")
        advice.append(
            _advice(
                f"plugin.{name}.pool.size",
                size,
                min(MAX_POOL, max(2 * size, size + 1)),
                ", ".join(parts) + " (or [plugins] pool_size for every plugin)",
            )
        )
    return advice


def _executor_advice(
    plugins: Mapping[str, Any], inputs: TuningInputs, seconds: float
) -> list[dict[str, Any]]:
    """The most expensive plugins: one that runs inline and takes a large share of the
    window holds up the event loop (ingest, HTTP) for that long."""
    advice = []
    for name, figures in plugins.items():
        settings = inputs.plugins.get(name)
        if settings is None or settings.executor != "inline" or figures["busy"] < BUSY_PLUGIN:
            continue
        advice.append(
            _advice(
                f"plugin.{name}.pool.executor",
                "inline",
                "thread",
                f"{figures['calls']} calls took {figures['seconds']:g} s, {figures['busy']:.0%} "
                f"of the last {seconds:.0f} s ({_num(figures['mean_call_ms'])} ms each), on the "
                "event loop; on a plugin thread they run beside ingest and HTTP",
            )
        )
    return advice


def _memory_advice(plugins: Mapping[str, Any], inputs: TuningInputs) -> list[dict[str, Any]]:
    """Instances recycled for memory: they grow to the high-water mark before
    ``recycle.after_executions`` replaces them, so recycle them by count a little sooner."""
    advice = []
    for name, figures in plugins.items():
        settings = inputs.plugins.get(name)
        by_memory = figures["recycles"].get("memory", 0)
        if settings is None or not by_memory or not figures["calls"]:
            continue
        calls_per_recycle = figures["calls"] / by_memory
        per_instance = max(1, int(calls_per_recycle * RECYCLE_MARGIN))
        after = settings.after_executions
        if after and after <= per_instance:
            continue
        advice.append(
            _advice(
                f"plugin.{name}.recycle.after_executions",
                after,
                per_instance,
                f"{by_memory} instances reached the memory mark of "
                f"{settings.memory_high_water_bytes} bytes in {figures['calls']} calls, one "
                f"every {calls_per_recycle:.0f} calls (largest idle instance now "
                f"{figures['memory_bytes']} bytes, grown {figures['memory_growth_bytes']} in "
                "the window); recycling by count first keeps instances small (or raise "
                "recycle.memory_high_water_bytes if the plugin needs that memory)",
            )
        )
    return advice


#: A rule whose evaluations take this share of one core is named in the advice.
EXPENSIVE_RULE_BUSY = 0.10


def _rule_advice(rules: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rules stopped at their instruction budget, time or memory limit (each stopped
    evaluation cost the whole budget), and rules that take a large share of a core."""
    advice = []
    for rule in rules["by_rule"]:
        stopped = {k: n for k, n in rule["errors"].items() if k in ("timeout", "memory")}
        if not stopped:
            if rule["busy"] >= EXPENSIVE_RULE_BUSY:
                advice.append(_expensive_rule(rule, rules))
            continue
        count = sum(stopped.values())
        advice.append(
            _advice(
                f"rule.{rule['rule']}",
                f"{count} evaluations stopped at a limit ({rule['evaluations']} evaluations)",
                "a cheaper condition or script, a narrower topic filter, or disable the rule",
                f"stopped: {', '.join(f'{k} {n}' for k, n in stopped.items())}; each one ran "
                "to the instruction budget or the time limit (rules.instruction_budget, "
                "rules.time_limit_s) and holds up the whole batch; after rules.quarantine_after "
                "in a row the rule is quarantined",
            )
        )
    return advice


def _expensive_rule(rule: Mapping[str, Any], rules: Mapping[str, Any]) -> dict[str, Any]:
    share_of_rules = rule["seconds"] / rules["seconds"] if rules["seconds"] else 1.0
    return _advice(
        f"rule.{rule['rule']}",
        f"{_share(rule['busy'])} of a core, {_num(rule['us_per_evaluation'])} us per "
        f"evaluation ({rule['evaluations']} evaluations)",
        "a cheaper condition or script, or a narrower topic filter",
        f"it takes {_share(share_of_rules)} of the time all rules took "
        f"({rule['seconds']:g} of {rules['seconds']:g} s), while the pipeline waits for each "
        "batch's rules before the next",
    )


#: A backlog at this share of ``max_backlog_mb`` is about to block or drop.
BACKLOG_NEARLY_FULL = 0.8


def _sink_advice(
    sinks: Mapping[str, Mapping[str, Any]], inputs: TuningInputs
) -> list[dict[str, Any]]:
    """Configured sinks that drop rows or whose backlog nears its bound, that reach nothing,
    or (HTTP) that send slower than rows arrive."""
    advice = []
    for name, configured in inputs.sinks.items():
        sink = sinks.get(name)
        if sink is None:
            continue
        budget = configured.max_backlog_mb * 1024 * 1024
        failures = sum(sink["failures"].values())
        if sink["dropped"] or sink["backlog_bytes"] >= BACKLOG_NEARLY_FULL * budget:
            advice.append(
                _advice(
                    f"sinks.{name}.max_backlog_mb",
                    configured.max_backlog_mb,
                    configured.max_backlog_mb * 2,
                    f"the backlog holds {sink['backlog_rows']} rows, "
                    f"{sink['backlog_bytes'] / budget:.0%} of max_backlog_mb, and "
                    f"{sink['dropped']} rows were dropped in the window (overflow = "
                    f"{configured.overflow}: at the bound "
                    + (
                        "the oldest rows are deleted unsent)"
                        if configured.overflow == "drop_oldest"
                        else "device messages wait unacknowledged)"
                    )
                    + "; a larger bound rides out a longer outage if the disk has room",
                )
            )
        if not sink["connected"] and not sink["sent"] and (failures or sink["backlog_rows"]):
            reasons = ", ".join(f"{k} {n}" for k, n in sink["failures"].items()) or "none"
            advice.append(
                _advice(
                    f"sinks.{name}.url",
                    configured.url,
                    "a receiver that answers (check the address, credentials and TLS files)",
                    f"nothing was delivered in the window and the sink is not connected; "
                    f"failures: {reasons}; {sink['backlog_rows']} rows wait, the oldest "
                    f"for {sink['oldest_age_s']:g} s (GET /api/v1/sinks/{name} has the last "
                    "error)",
                )
            )
        elif (
            configured.type == "http"
            and sink["connected"]
            and sink["sent"]
            and sink["backlog_growth"] > 0
            and sink["arriving_per_s"] > sink["sent_per_s"]
            and configured.batch_size < MAX_SINK_BATCH
        ):
            advice.append(
                _advice(
                    f"sinks.{name}.batch_size",
                    configured.batch_size,
                    min(MAX_SINK_BATCH, configured.batch_size * 4),
                    f"rows arrive at {_rate(sink['arriving_per_s'])} and are sent at "
                    f"{_rate(sink['sent_per_s'])}, one POST of at most "
                    f"{configured.batch_size} rows at a time; the backlog grew by "
                    f"{sink['backlog_growth']} rows. Larger batches mean fewer round trips",
                )
            )
    return advice


# -- output -----------------------------------------------------------------------------------


def _round(value: float) -> float:
    return round(value, 4)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _num(value: float | None) -> str:
    """A figure for text: three significant digits or so, "-" when there is none."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2g}"


def _rate(value: float) -> str:
    return f"{value:,.1f}/s" if value < 100 else f"{value:,.0f}/s"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def format_report(report: Mapping[str, Any]) -> str:
    """The report as text for a terminal (``flux report``)."""
    stages = report["stages"]
    store, pipeline, rules = stages["store"], stages["pipeline"], stages["rules"]
    lines = [f"flux tuning report over the last {report['window_s']:.0f} s", ""]
    ingest = ", ".join(f"{k} {_rate(v)}" for k, v in stages["ingest"]["events_per_s"].items())
    lines.append(f"events    {ingest or 'none'}")
    for name, sub in stages["bus"]["subscribers"].items():
        lines.append(
            f"bus       {name}: {sub['depth']} queued (at most {sub['max_depth']} of "
            f"{sub['capacity']}), {sub['blocked']} senders waited, {sub['dropped']} dropped"
        )
    lines.append(
        f"pipeline  busy {_share(pipeline['busy'])} (rules {pipeline['rules_s']:g} s, "
        f"plugins {pipeline['plugins_s']:g} s); {rules['evaluations']} rule evaluations, "
        f"{_num(rules['us_per_evaluation'])} us each"
    )
    lines.append(
        f"store     busy {_share(store['busy'])}, {store['commits']} commits of "
        f"{store['mean_batch']:.1f} events (batch_size {store['batch_size']}), "
        f"{_num(store['commit_ms_mean'])} ms each (p99 {_num(store['commit_ms_p99'])}); "
        f"receipt to commit p50 {_num(store['latency_ms_p50'])} ms, "
        f"p99 {_num(store['latency_ms_p99'])} ms"
    )
    for rule in rules["by_rule"][:5]:
        if rule["seconds"]:
            lines.append(
                f"rule      {rule['rule']}: busy {_share(rule['busy'])}, "
                f"{_num(rule['us_per_evaluation'])} us per evaluation, "
                f"{rule['evaluations']} evaluations, {rule['matches']} matches"
            )
    for name, plugin in stages["plugins"].items():
        lines.append(
            f"plugin    {name}: {plugin['calls']} calls, busy {_share(plugin['busy'])}, hit "
            f"ratio {_share(plugin['hit_ratio'])}, {plugin['waits']} waited, "
            f"{plugin['exhausted']} exhausted"
        )
    for name, sink in stages.get("sinks", {}).items():
        lines.append(
            f"sink      {name}: {sink['backlog_rows']} rows waiting (oldest "
            f"{sink['oldest_age_s']:g} s), sent {_rate(sink['sent_per_s'])}, "
            f"{'connected' if sink['connected'] else 'NOT connected'}, "
            f"{sum(sink['failures'].values())} failures, {sink['dropped']} dropped"
        )
    lines.append("")
    if not report["advice"]:
        lines.append("no advice: nothing in the window calls for a change")
    for entry in report["advice"]:
        lines.append(f"* {entry['setting']}: {entry['current']} -> {entry['suggested']}")
        lines.append(f"  {entry['reason']}")
    return "\n".join(lines)


__all__ = [
    "PluginSettings",
    "SinkSettings",
    "TuningInputs",
    "format_report",
    "inputs_for",
    "tuning_report",
]
