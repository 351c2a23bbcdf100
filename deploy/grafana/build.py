"""Generate the Grafana dashboard ``flux.json`` beside this file from the panels below.

    python deploy/grafana/build.py           # write flux.json
    python deploy/grafana/build.py --check   # exit 1 if flux.json differs from what it makes

Built with grafana-foundation-sdk (Grafana's own builders, 11.6 schema). Every query carries
``instance=~"$instance"``; the dashboard asks for a Prometheus data source on import.
``tests/deploy/test_grafana.py`` fails when the committed JSON is stale, and
``tests/deploy/test_exported_names.py`` when a query names a metric or a label that a
running gateway does not export.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    LegendDisplayMode,
    LegendPlacement,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)

OUTPUT = Path(__file__).with_name("flux.json")
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: Every selector's instance filter (the dashboard's multi-value ``instance`` variable).
INST = 'instance=~"$instance"'
RATE = "$__rate_interval"
#: The design's pool hit-ratio thresholds: green from 0.8, yellow from 0.6, red below.
HIT_RATE_THRESHOLDS = ((None, "red"), (0.6, "yellow"), (0.8, "green"))

#: A row of the dashboard: its title and its panels.
Section = tuple[str, list[Timeseries | Stat]]


def query(expr: str, legend: str, ref: str) -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def chart(
    title: str,
    unit: str,
    *queries: tuple[str, str],
    description: str = "",
    width: int = 8,
) -> Timeseries:
    """A time series panel of ``queries`` (expression, legend)."""
    panel = (
        Timeseries()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(8)
        .line_width(1)
        .fill_opacity(10)
        .legend(
            VizLegendOptions()
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )
    for ref, (expr, legend) in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(query(expr, legend, ref))
    return panel


def hit_rate() -> Stat:
    """The seed's pool health figure per plugin, coloured by the design's thresholds."""
    hits = f"sum by (plugin) (rate(flux_plugin_pool_hits_total{{{INST}}}[{RATE}]))"
    misses = f"sum by (plugin) (rate(flux_plugin_pool_misses_total{{{INST}}}[{RATE}]))"
    return (
        Stat()
        .title("Plugin Pool Hit Rate")
        .description(
            "Calls that found a warm instance. Green from 80 %, yellow from 60 %, red below "
            "(the PluginPoolLowHitRate alert fires below 60 % for 5 minutes)."
        )
        .datasource(DATASOURCE)
        .unit("percentunit")
        .min(0)
        .max(1)
        .decimals(1)
        .span(8)
        .height(8)
        .color_mode(BigValueColorMode.BACKGROUND)
        .graph_mode(BigValueGraphMode.AREA)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
        .thresholds(
            ThresholdsConfig()
            .mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(value=value, color=color) for value, color in HIT_RATE_THRESHOLDS])
        )
        .with_target(query(f"{hits} / ({hits} + {misses})", "{{plugin}}", "A"))
    )


def up_down(title: str, description: str, expr: str, legend: str, down: str, up: str) -> Stat:
    """A stat per series of a 0/1 gauge: red ``down`` text at 0, green ``up`` at 1."""
    return (
        Stat()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(8)
        .height(8)
        .color_mode(BigValueColorMode.BACKGROUND)
        .graph_mode(BigValueGraphMode.NONE)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
        .mappings(
            [
                ValueMap(
                    options={
                        "0": ValueMappingResult(text=down, color="red"),
                        "1": ValueMappingResult(text=up, color="green"),
                    }
                )
            ]
        )
        .thresholds(
            ThresholdsConfig()
            .mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(value=None, color="red"), Threshold(value=1, color="green")])
        )
        .with_target(query(expr, legend, "A"))
    )


def mqtt_connected() -> Stat:
    return up_down(
        "MQTT connected",
        "1 while the gateway has its session with the broker (MqttDisconnected).",
        f"min by (instance) (flux_mqtt_connected{{{INST}}})",
        "{{instance}}",
        "disconnected",
        "connected",
    )


def quantile(q: float, histogram: str, by: str = "", where: str = "") -> str:
    labels = f"{INST}, {where}" if where else INST
    group = f"{by}, le" if by else "le"
    return (
        f"histogram_quantile({q}, sum by ({group}) (rate({histogram}_bucket{{{labels}}}[{RATE}])))"
    )


def events_row() -> Section:
    return (
        "Events",
        [
            chart(
                "Events in and stored",
                "ops",
                (
                    f"sum by (source) (rate(flux_events_published_total{{{INST}}}[{RATE}]))",
                    "in: {{source}}",
                ),
                (f"sum(rate(flux_db_batch_size_sum{{{INST}}}[{RATE}]))", "stored (all rows)"),
                description="Events delivered on the bus per source (derived: made by plugins "
                "and rule actions) and event rows committed.",
            ),
            chart(
                "Receipt to commit latency",
                "s",
                (quantile(0.5, "flux_event_commit_latency_seconds"), "p50"),
                (quantile(0.99, "flux_event_commit_latency_seconds"), "p99"),
                (
                    quantile(
                        0.95,
                        "flux_http_request_duration_seconds",
                        where='route=~"/api/v1/events?", method="POST"',
                    ),
                    "HTTP ingest p95",
                ),
                description="From receipt (MQTT or HTTP) to the commit of the batch holding "
                "the event; HighEventLatency fires above 100 ms for 5 minutes.",
            ),
            chart(
                "Bus depth against capacity",
                "short",
                (
                    f"sum by (subscriber) (flux_eventbus_depth{{{INST}}})",
                    "queued: {{subscriber}}",
                ),
                (f"max(flux_eventbus_capacity{{{INST}}})", "capacity"),
                description="Events waiting per subscriber (EventBusSaturated fires above "
                "80 % of eventbus.capacity for 5 minutes).",
            ),
            chart(
                "Senders waiting, events dropped",
                "ops",
                (
                    f"sum by (subscriber) (rate(flux_eventbus_blocked_total{{{INST}}}[{RATE}]))",
                    "waited: {{subscriber}}",
                ),
                (
                    f"sum by (subscriber, reason) "
                    f"(rate(flux_eventbus_dropped_total{{{INST}}}[{RATE}]))",
                    "dropped: {{subscriber}} ({{reason}})",
                ),
                description="Events whose sender waited for room (back-pressure) and QoS 0 "
                "events a drop policy dropped.",
            ),
            chart(
                "Dead letters by reason",
                "ops",
                (
                    f"sum by (reason) (rate(flux_dead_letters_total{{{INST}}}[{RATE}]))",
                    "{{reason}}",
                ),
                description="Messages stored as dead letters (GET /api/v1/dead-letters); "
                "DeadLettersRising fires when they keep arriving for 10 minutes.",
            ),
            chart(
                "Degraded",
                "short",
                (f"max by (reason) (flux_degraded{{{INST}}}) > 0", "{{reason}}"),
                description="Each reason the gateway reports as degraded (/ready).",
            ),
        ],
    )


def rules_row() -> Section:
    return (
        "Rules",
        [
            chart(
                "Rule evaluations",
                "ops",
                (
                    f"sum by (rule) (rate(flux_rule_evaluations_total{{{INST}}}[{RATE}]))",
                    "{{rule}}",
                ),
            ),
            chart(
                "Rule matches",
                "ops",
                (f"sum by (rule) (rate(flux_rule_matches_total{{{INST}}}[{RATE}]))", "{{rule}}"),
            ),
            chart(
                "Rule errors",
                "ops",
                (
                    f"sum by (rule, kind) (rate(flux_rule_errors_total{{{INST}}}[{RATE}]))",
                    "{{rule}}: {{kind}}",
                ),
                (f"max(flux_rules_quarantined{{{INST}}})", "quarantined rules"),
            ),
            chart(
                "Rule cost per evaluation",
                "s",
                (
                    f"sum by (rule) (rate(flux_rule_eval_seconds_total{{{INST}}}[{RATE}])) / "
                    f"sum by (rule) (rate(flux_rule_evaluations_total{{{INST}}}[{RATE}]))",
                    "{{rule}}",
                ),
                (quantile(0.99, "flux_rule_eval_seconds"), "p99 of one batch (all rules)"),
                description="Rules are evaluated fused, one Lua call per batch; each batch's "
                "time is split among its rules by the Lua work each did (sampled), see the "
                "README. Time per evaluation of each rule, and the p99 of a whole batch.",
                width=12,
            ),
            chart(
                "Rule time per rule",
                "percentunit",
                (
                    f"sum by (rule) (rate(flux_rule_eval_seconds_total{{{INST}}}[{RATE}]))",
                    "{{rule}}",
                ),
                description="Share of one core each rule takes (flux_rule_eval_seconds_total): "
                "the costliest rules stand out here.",
                width=12,
            ),
            chart(
                "Rule evaluation busy",
                "percentunit",
                (f"sum(rate(flux_rule_eval_seconds_sum{{{INST}}}[{RATE}]))", "rules"),
                (f"sum(rate(flux_plugin_call_seconds_sum{{{INST}}}[{RATE}]))", "plugins"),
                description="Share of one core spent evaluating rules and in plugin calls.",
                width=24,
            ),
        ],
    )


def plugins_row() -> Section:
    return (
        "Plugins",
        [
            hit_rate(),
            chart(
                "Plugin executions",
                "ops",
                (
                    f"sum by (plugin, result) "
                    f"(rate(flux_plugin_executions_total{{{INST}}}[{RATE}]))",
                    "{{plugin}}: {{result}}",
                ),
            ),
            chart(
                "Plugin traps and recycles",
                "ops",
                (
                    f'sum by (plugin) (rate(flux_plugin_executions_total{{{INST}, result="trap"}}'
                    f"[{RATE}]))",
                    "trap: {{plugin}}",
                ),
                (
                    f"sum by (plugin, reason) (rate(flux_plugin_recycles_total{{{INST}}}[{RATE}]))",
                    "recycled: {{plugin}} ({{reason}})",
                ),
            ),
            chart(
                "Plugin call time p99",
                "s",
                (quantile(0.99, "flux_plugin_call_seconds", by="plugin"), "{{plugin}}"),
            ),
            chart(
                "Pool waits and exhaustion",
                "ops",
                (
                    f"sum by (plugin) (rate(flux_plugin_pool_waits_total{{{INST}}}[{RATE}]))",
                    "waited: {{plugin}}",
                ),
                (
                    f"sum by (plugin) (rate(flux_plugin_pool_exhausted_total{{{INST}}}[{RATE}]))",
                    "exhausted: {{plugin}}",
                ),
            ),
            chart(
                "Plugin instance memory",
                "bytes",
                (f"max by (plugin) (flux_plugin_memory_bytes{{{INST}}})", "{{plugin}}"),
                description="Largest idle instance; recycled past recycle.memory_high_water_bytes.",
            ),
        ],
    )


def store_row() -> Section:
    commit = 'operation="write_batch"'
    return (
        "Database and MQTT",
        [
            chart(
                "Commit time",
                "s",
                (quantile(0.5, "flux_db_query_duration_seconds", where=commit), "p50"),
                (quantile(0.99, "flux_db_query_duration_seconds", where=commit), "p99"),
            ),
            chart(
                "Batch size",
                "short",
                (
                    f"sum(rate(flux_db_batch_size_sum{{{INST}}}[{RATE}])) / "
                    f"sum(rate(flux_db_batch_size_count{{{INST}}}[{RATE}]))",
                    "events per commit",
                ),
                (quantile(0.99, "flux_db_batch_size"), "p99"),
            ),
            chart(
                "Database connections",
                "short",
                (f"sum(flux_db_connections_active{{{INST}}})", "active"),
                (f"sum(flux_db_connections_idle{{{INST}}})", "idle"),
                description="SQLAlchemy's pool: database.pool_size + max_overflow at most.",
            ),
            mqtt_connected(),
            chart(
                "MQTT messages and reconnects",
                "ops",
                (
                    f"sum by (qos) (rate(flux_mqtt_messages_total{{{INST}}}[{RATE}]))",
                    "received QoS {{qos}}",
                ),
                (f"sum(rate(flux_mqtt_reconnects_total{{{INST}}}[{RATE}]))", "reconnects"),
            ),
            chart(
                "HTTP request time p95",
                "s",
                (
                    quantile(0.95, "flux_http_request_duration_seconds", by="method, route"),
                    "{{method}} {{route}}",
                ),
            ),
        ],
    )


def sink_connected() -> Stat:
    return up_down(
        "Sinks connected",
        "1 while a sink reaches its receiver (its last send worked).",
        f"min by (sink) (flux_sink_connected{{{INST}}})",
        "{{sink}}",
        "down",
        "up",
    ).span(6)


def sinks_row() -> Section:
    return (
        "Sinks",
        [
            chart(
                "Sink backlog",
                "short",
                (f"sum by (sink) (flux_sink_backlog{{{INST}}})", "{{sink}} rows"),
                description="Rows in the outbox waiting for each sink's receiver.",
                width=6,
            ),
            chart(
                "Sink backlog bytes",
                "bytes",
                (f"sum by (sink) (flux_sink_backlog_bytes{{{INST}}})", "{{sink}}"),
                description="Against sinks.<name>.max_backlog_mb: at it, overflow = block "
                "stops acknowledging device messages, drop_oldest drops the oldest rows.",
                width=6,
            ),
            chart(
                "Oldest row waiting",
                "s",
                (f"max by (sink) (flux_sink_oldest_age_seconds{{{INST}}})", "{{sink}}"),
                (
                    f"max by (sink) (flux_sink_alert_after_seconds{{{INST}}})",
                    "{{sink}} alert_after_s",
                ),
                description="SinkBacklogOld fires when the oldest row waits longer than the "
                "sink's alert_after_s for 2 minutes.",
                width=6,
            ),
            sink_connected(),
            chart(
                "Rows sent",
                "ops",
                (f"sum by (sink) (rate(flux_sink_sent_total{{{INST}}}[{RATE}]))", "{{sink}}"),
                width=8,
            ),
            chart(
                "Send failures",
                "ops",
                (
                    f"sum by (sink, reason) (rate(flux_sink_failures_total{{{INST}}}[{RATE}]))",
                    "{{sink}}: {{reason}}",
                ),
                description="Each failed send is retried with a capped backoff.",
                width=8,
            ),
            chart(
                "Rows dropped",
                "ops",
                (
                    f"sum by (sink, reason) (rate(flux_sink_dropped_total{{{INST}}}[{RATE}]))",
                    "{{sink}}: {{reason}}",
                ),
                description="drop_oldest over max_backlog_mb, or a webhook given up.",
                width=8,
            ),
        ],
    )


def build() -> Dashboard:
    dashboard = (
        Dashboard("flux")
        .uid("flux-gateway")
        .description("The flux IoT gateway: ingest, bus, rules, plugins, sinks, database, MQTT.")
        .tags(["flux", "iot", "mqtt"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            QueryVariable("instance")
            .label("Instance")
            .datasource(DATASOURCE)
            .query("label_values(flux_mqtt_connected, instance)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )
    panel_id = 0
    rows = (events_row(), rules_row(), plugins_row(), sinks_row(), store_row())
    for title, panels in rows:
        panel_id += 1
        dashboard = dashboard.with_row(Row(title).id(panel_id).collapsed(False))
        for panel in panels:
            panel_id += 1
            dashboard = dashboard.with_panel(panel.id(panel_id))
    return dashboard


def render() -> str:
    """The dashboard as the JSON committed in ``flux.json``."""
    model: Any = json.loads(JSONEncoder(sort_keys=True, indent=2).encode(build().build()))
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if flux.json is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
