"""Every metric and label that the Grafana dashboard and the alert rules name is one that a
running gateway exports.

A real gateway (shipped rules and plugins, a pool of one, a tiny bus) processes real MQTT
and HTTP traffic until every series the queries name exists, then its ``/metrics`` is
parsed and each query's metric names, label matchers and grouping labels (PromQL parsed by
promql-parser) are checked against it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    FleetDevice,
    Upstream,
    device,
    free_port,
    make_settings,
    unique,
    wait_until,
)
from tests.plugins.helpers import POOL_OF_ONE, echo_module, event, write_plugin

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "flux.json"
ALERTS = REPO / "deploy" / "prometheus" / "flux-alerts.yml"
#: Labels Prometheus adds to every series it scrapes, and PromQL's own.
TARGET_LABELS = frozenset({"instance", "job"})
_LABEL_VALUES = re.compile(r"label_values\((\w+),\s*(\w+)\)")


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and variable of the dashboard."""
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in data["templating"]["list"]:
        found = _LABEL_VALUES.fullmatch(str(variable.get("query", "")))
        if found:  # label_values(metric, label): the metric with that label
            yield f"variable {variable['name']!r}", f"count by ({found[2]}) ({found[1]})"


def alert_queries() -> Iterator[tuple[str, str]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in data["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule['alert']}", rule["expr"]


@dataclass
class Names:
    """What one query names: metric (sample) names and labels, and grouping labels with
    the metrics below them."""

    selectors: list[tuple[str, set[str]]] = field(default_factory=list)
    groupings: list[tuple[set[str], set[str]]] = field(default_factory=list)


def selectors_below(node: Any) -> list[tuple[str, set[str]]]:
    found: list[tuple[str, set[str]]] = []

    def visit(inner: Any) -> bool:
        if isinstance(inner, promql_parser.VectorSelector):
            assert inner.name, f"a selector without a metric name: {inner}"
            labels = {m.name for m in inner.matchers.matchers}
            found.append((inner.name, labels))
        return True

    promql_parser.walk(node, visit)
    return found


def names_in(expr: str) -> Names:
    tree = promql_parser.parse(expr.replace("$__rate_interval", "5m"))
    names = Names(selectors=selectors_below(tree))

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            metrics = {name for name, _ in selectors_below(node.expr)}
            names.groupings.append((set(node.modifier.labels), metrics))
        return True

    promql_parser.walk(tree, visit)
    return names


def exported(metrics_text: str) -> dict[str, set[str] | None]:
    """Sample name -> label names seen on its samples (None: declared, no sample yet)."""
    samples: dict[str, set[str] | None] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    for family in text_string_to_metric_families(metrics_text):
        for suffix in suffixes.get(family.type, ("",)):
            samples.setdefault(family.name + suffix, None)
        for sample in family.samples:
            labels = samples.get(sample.name) or set()
            samples[sample.name] = labels | set(sample.labels)
    return samples


def named_metrics() -> set[str]:
    """Every metric a dashboard or alert query names."""
    return {
        metric
        for _, expr in [*dashboard_queries(), *alert_queries()]
        for metric, _ in names_in(expr).selectors
    }


def problems(where: str, expr: str, samples: dict[str, set[str] | None]) -> list[str]:
    found: list[str] = []
    names = names_in(expr)

    def labels_of(metric: str) -> set[str]:
        return samples.get(metric) or set()

    for metric, labels in names.selectors:
        if metric not in samples:
            found.append(f"{where}: {metric} is not exported")
            continue
        if labels - TARGET_LABELS and samples[metric] is None:
            found.append(f"{where}: {metric} has no samples to check {sorted(labels)} against")
            continue
        missing = labels - TARGET_LABELS - labels_of(metric)
        if missing:
            found.append(f"{where}: {metric} has no label {sorted(missing)}")
    for grouping, metrics in names.groupings:
        known = set().union(*(labels_of(metric) for metric in metrics)) | TARGET_LABELS
        if grouping - known:
            found.append(f"{where}: no label {sorted(grouping - known)} on {sorted(metrics)}")
    return found


def test_the_name_check_catches_unknown_metrics_and_labels() -> None:
    samples = exported(
        '# TYPE flux_a_total counter\nflux_a_total{plugin="p"} 1\n'
        '# TYPE flux_b histogram\nflux_b_bucket{le="+Inf"} 1\nflux_b_sum 1\nflux_b_count 1\n'
        "# TYPE flux_c counter\n"
    )
    fine = [
        'sum by (plugin, instance) (rate(flux_a_total{plugin="x"}[5m]))',
        "histogram_quantile(0.5, sum by (le) (rate(flux_b_bucket[5m])))",
        "rate(flux_c_total[5m])",
    ]
    for expr in fine:
        assert problems("q", expr, samples) == [], expr
    assert problems("q", "flux_missing", samples) == ["q: flux_missing is not exported"]
    assert problems("q", 'flux_a_total{rule="r"}', samples) == [
        "q: flux_a_total has no label ['rule']"
    ]
    assert problems("q", "sum by (rule) (flux_a_total)", samples) == [
        "q: no label ['rule'] on ['flux_a_total']"
    ]
    assert problems("q", 'flux_c_total{kind="x"}', samples) == [
        "q: flux_c_total has no samples to check ['kind'] against"
    ]


async def test_every_metric_and_label_the_dashboard_and_alerts_name_is_exported(
    tmp_path: Path, broker: tuple[str, int], serve_gateway: Any, upstream: Upstream
) -> None:
    dev = unique("dev")
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    (rules / "broken.toml").write_text(
        '[[rules]]\nid = "broken"\ntopic = "devices/+/telemetry"\n'
        'script = "return 1 + {}"\nactions = [{ type = "alert" }]\n'
    )
    plugins = tmp_path / "plugins"
    shutil.copytree(REPO / "plugins", plugins, ignore=shutil.ignore_patterns("*.md"))
    write_plugin(
        plugins,
        "echo",
        echo_module(),
        topics=("nothing/#",),
        manifest=POOL_OF_ONE + "[recycle]\nafter_executions = 2\n",
    )
    settings = make_settings(
        tmp_path,
        broker,
        device_ids=[dev],
        eventbus={"capacity": 8, "overflow": "drop_newest"},
        metrics={"sample_interval_s": 0.2, "history_s": 10},
        plugins={"dir": str(plugins)},
        # A sink that forwards, and one whose receiver is gone: it fails, and its tiny
        # backlog drops the oldest rows.
        sinks={
            "cloud": upstream.sink(topics=[f"devices/{dev}/#"]),
            "gone": {
                "type": "http",
                "url": f"http://127.0.0.1:{free_port()}/ingest",
                "topics": [f"devices/{dev}/#"],
                "max_backlog_mb": 0.001,
                "overflow": "drop_oldest",
                "retry_max_delay_s": 0.5,
            },
        },
    )
    async with (
        serve_gateway(settings) as (gateway, server),
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
    ):
        fleet = FleetDevice(0, seed=1, first_ts=1_700_000_000, interval_s=1)

        async def scrape() -> dict[str, set[str] | None]:
            return exported((await client.get("/metrics")).text)

        async def all_series_exist() -> bool:
            with device(*broker) as sensor:
                for qos in (0, 1):  # QoS 0 bursts overflow the tiny bus and are dropped
                    for _ in range(100):
                        payload = orjson.dumps(fleet.reading())
                        sensor.publish(f"devices/{dev}/telemetry", payload, qos=qos)
                sensor.publish(f"devices/{dev}/telemetry", b"{not json", qos=1).wait_for_publish()
            posted = [{"topic": f"devices/{dev}/telemetry", "payload": fleet.reading()}] * 20
            assert (await client.post("/api/v1/events", json=posted)).status_code == 201
            calls = [gateway.plugins.call("echo", event("nothing/x")) for _ in range(10)]
            await asyncio.gather(*calls, return_exceptions=True)
            samples = await scrape()
            unseen[:] = sorted(m for m in named_metrics() if samples.get(m) is None)
            return not unseen

        unseen: list[str] = []
        try:
            await wait_until(all_series_exist, timeout=60, what="every named series to exist")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; never seen: {unseen}") from None
        samples = await scrape()

    found = [
        problem
        for where, expr in [*dashboard_queries(), *alert_queries()]
        for problem in problems(where, expr, samples)
    ]
    assert found == []
    checked = {name for _, expr in dashboard_queries() for name, _ in names_in(expr).selectors}
    assert len(checked) >= 25  # the check saw the dashboard's queries, not an empty list
