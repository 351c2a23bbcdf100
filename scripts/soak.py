"""Soak a real gateway process: a steady paced QoS 1 load, resources sampled as it runs.

A benchmark, not a test (issue 5, scenario 11): ``python -m scripts.soak --minutes 10``.
It starts a private Mosquitto and ``flux run`` (the same set-up as the bench: generated
rules and a shipped plugin, or with ``--shipped`` the shipped ``config.toml``, ``rules/``
and ``plugins/``; SQLite unless ``--database-url``), publishes ``--rate``
QoS 1 messages a second from ``--devices`` simulated devices for ``--minutes``, and every
``--sample-s`` seconds records the gateway's RSS and open files (``/proc/PID``), its
threads and CPU, the asyncio tasks, bus depth and in-flight MQTT messages
(``/api/v1/status``), the plugin instances (``/api/v1/plugins``) and how far the database
lags behind what the broker acknowledged. At the end it waits for every message to be
stored, stops the gateway with SIGTERM and prints, per series, first/last/min/max and the
least-squares slope per minute over the whole run and over its second half (after
warm-up), then writes everything to ``--output`` (soak-results.json).

A flat run: the second-half slopes of RSS, open files and plugin instances are about zero,
the asyncio tasks once idle again are as many as before the load (under load there is one
per message in flight), every message is stored, and the gateway exits with 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from scripts.bench.bench import Bench
from scripts.bench.database import Database
from scripts.bench.processes import cpu_model
from scripts.bench.report import versions
from tests.harness import fleet

#: Series that must stay flat in a healthy soak (second-half slope per minute, threshold).
#: Tasks are judged idle before the load against idle after it (see ``main``).
FLAT = {"rss_mib": 2.0, "open_files": 0.5, "plugin_instances": 0.5}


class Load:
    """Paced QoS 1 publishers (one paho client per device of a drifting fleet, so the shipped
    rules match now and then) and their broker PUBACK counts."""

    def __init__(self, port: int, devices: int, rate: float) -> None:
        self.rate = rate
        self.fleet = fleet(devices, 0, interval_s=devices / rate)
        self.sent = 0
        self.acked = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.clients: list[paho.Client] = []
        for i in range(devices):
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-dev-{i}")
            client.max_inflight_messages_set(1000)
            client.max_queued_messages_set(0)
            client.on_publish = self._on_publish
            client.connect("127.0.0.1", port)
            client.loop_start()
            self.clients.append(client)
        self._thread = threading.Thread(target=self._run, name="soak-load", daemon=True)

    def _on_publish(self, *args: Any) -> None:
        with self._lock:
            self.acked += 1

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        seq = 0
        while not self._stop.is_set():
            due = started + seq / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)  # pacing the stream
                continue
            index = seq % len(self.clients)
            device = self.fleet[index]
            payload = orjson.dumps(device.reading())
            self.clients[index].publish(device.topic, payload, qos=1)
            seq += 1
            self.sent = seq

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_stop()


def _get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.loads(response.read())


def _proc(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "open_files": len(os.listdir(f"/proc/{pid}/fd")),
        "cpu_s": (int(stat[11]) + int(stat[12])) / ticks,
    }


def sample(
    bench: Bench, pid: int, load: Load, started: float, latency: CommitLatency
) -> dict[str, Any]:
    """One row: process figures from /proc, the rest from the gateway's own API."""
    assert bench.db is not None
    row: dict[str, Any] = {"t_s": round(time.monotonic() - started, 1), **_proc(pid)}
    status = _get_json(bench.http_port, "/api/v1/status")
    plugins = _get_json(bench.http_port, "/api/v1/plugins")["plugins"]
    row["tasks"] = status.get("tasks")
    row["bus_depth"] = sum(status["bus_depth"].values())
    row["mqtt_pending"] = status["mqtt_pending"]
    row["degraded"] = sorted(status.get("degraded", {}))
    row["plugin_instances"] = sum(p["pool"]["size"] for p in plugins)
    row["plugin_recycles"] = sum(sum(p["pool"]["recycles"].values()) for p in plugins)
    row["sent"] = load.sent
    row["acked_by_broker"] = load.acked
    row["stored"] = bench.db.device_messages()
    row["lag"] = row["acked_by_broker"] - row["stored"]
    row["db_mib"] = round(bench.db.size_bytes() / 2**20, 2)
    row.update(latency.read())
    return row


class CommitLatency:
    """From the gateway's /metrics: rows purged so far, and the receipt-to-commit p99 since
    the previous reading (the histogram's buckets, differenced)."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._previous: dict[float, float] = {}

    def read(self) -> dict[str, float | None]:
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self._port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        purged = 0.0
        buckets: dict[float, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "flux_retention_purged_total":
                    purged += sample.value
                elif sample.name == "flux_event_commit_latency_seconds_bucket":
                    buckets[float(sample.labels["le"])] = sample.value
        window = sorted((le, count - self._previous.get(le, 0.0)) for le, count in buckets.items())
        self._previous = buckets
        total = window[-1][1] if window else 0.0
        p99 = next((le for le, count in window if total and count >= 0.99 * total), None)
        return {
            "purged_rows": purged,
            "commit_p99_ms": round(p99 * 1000, 1) if p99 is not None else None,
        }


def _slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    keys = ["rss_mib", "open_files", "threads", "tasks", "plugin_instances"]
    keys += ["bus_depth", "mqtt_pending", "lag", "cpu_s", "db_mib", "commit_p99_ms", "purged_rows"]
    half = rows[len(rows) // 2 :]
    summary: dict[str, dict[str, float]] = {}
    for key in keys:
        values = [(row["t_s"], float(row[key])) for row in rows if row.get(key) is not None]
        if not values:
            continue
        tail = [(row["t_s"], float(row[key])) for row in half if row.get(key) is not None]
        summary[key] = {
            "first": values[0][1],
            "last": values[-1][1],
            "min": min(v for _, v in values),
            "max": max(v for _, v in values),
            "slope_per_min": round(_slope_per_min(values), 3),
            "second_half_slope_per_min": round(_slope_per_min(tail), 3),
        }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10, help="duration of the load")
    parser.add_argument("--rate", type=float, default=500, help="QoS 1 messages per second")
    parser.add_argument("--devices", type=int, default=10, help="simulated devices")
    parser.add_argument("--sample-s", type=float, default=5, help="seconds between samples")
    parser.add_argument("--capacity", type=int, default=1024, help="eventbus.capacity")
    parser.add_argument("--batch-size", type=int, default=500, help="database.batch_size")
    parser.add_argument("--rules", type=int, default=10, help="generated rules (0 = none)")
    parser.add_argument("--plugin", default="enrich", help="shipped plugin ('' = none)")
    parser.add_argument("--database-url", default="", help="PostgreSQL URL instead of SQLite")
    parser.add_argument(
        "--retention-interval-s", type=float, default=0, help="database.retention_interval_s"
    )
    parser.add_argument("--max-size-mb", type=float, default=0, help="database.max_size_mb")
    parser.add_argument(
        "--shipped",
        action="store_true",
        help="the shipped config.toml, rules/ and plugins/ instead of generated rules",
    )
    parser.add_argument("--output", default="soak-results.json")
    args = parser.parse_args()
    args.qos = 1
    args.profile = ""
    args.broker = "embedded"  # the broker the shipped config.toml starts
    bench = Bench(args=args)
    broker = bench.new_broker()
    bench.db = (
        Database(args.database_url)
        if args.database_url
        else Database(f"sqlite+aiosqlite:///{bench.workdir}/bench.db", bench.workdir / "bench.db")
    )
    rows: list[dict[str, Any]] = []
    exit_code: int | None = None
    try:
        bench.db.reset()
        database: dict[str, Any] = {"max_size_mb": args.max_size_mb}
        if args.retention_interval_s:
            database["retention_interval_s"] = args.retention_interval_s
        mqtt = {"client_id": "flux-soak"}
        config = (
            bench.shipped_config(mqtt=mqtt, database=database)
            if args.shipped
            else bench.config(mqtt=mqtt, database=database)
        )
        with bench.gateway(config) as gateway:
            process = gateway.process
            load = Load(broker.port, args.devices, args.rate)
            latency = CommitLatency(bench.http_port)
            started = time.monotonic()
            idle_before = sample(bench, process.pid, load, started, latency)
            load.start()
            end = started + args.minutes * 60
            next_sample = started
            try:
                while time.monotonic() < end:
                    now = time.monotonic()
                    if now >= next_sample:
                        row = sample(bench, process.pid, load, started, latency)
                        rows.append(row)
                        print(
                            f"t={row['t_s']:>6.0f}s rss={row['rss_mib']:6.1f}MiB "
                            f"fds={row['open_files']} threads={row['threads']} "
                            f"tasks={row['tasks']} instances={row['plugin_instances']} "
                            f"depth={row['bus_depth']} pending={row['mqtt_pending']} "
                            f"lag={row['lag']} db={row['db_mib']}MiB "
                            f"p99={row['commit_p99_ms']}ms purged={row['purged_rows']:.0f} "
                            f"degraded={','.join(row['degraded']) or '-'}",
                            flush=True,
                        )
                        next_sample += args.sample_s
                    time.sleep(min(0.2, max(0.0, next_sample - time.monotonic())))
            finally:
                load.stop()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and (
                bench.db.device_messages() < load.sent
                or _get_json(bench.http_port, "/api/v1/status")["mqtt_pending"]
            ):
                time.sleep(0.2)
            idle_after = sample(bench, process.pid, load, started, latency)
            load.close()
            sent, stored = load.sent, bench.db.device_messages()
            process.send_signal(signal.SIGTERM)
            exit_code = process.wait(60)
    finally:
        bench.close_broker()
        shutil.rmtree(bench.workdir, ignore_errors=True)
    summary = summarize(rows)
    flat = {
        key: abs(summary[key]["second_half_slope_per_min"]) <= limit
        for key, limit in FLAT.items()
        if key in summary
    }
    # Under load tasks come and go (a message waiting for room on the bus has one), so they
    # are noise around a level; what must not grow is the idle count.
    flat["tasks"] = idle_after["tasks"] <= idle_before["tasks"] + 2
    report = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "versions": versions(),
        "settings": vars(args),
        "sent": sent,
        "stored": stored,
        "exit_code": exit_code,
        "flat": flat,
        "idle_before": idle_before,
        "idle_after": idle_after,
        "summary": summary,
        "samples": rows,
    }
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\nsoak: {args.minutes} min at {args.rate:.0f} msg/s QoS 1; sent {sent}, stored {stored}"
    )
    print(
        f"{'series':<18}{'first':>10}{'last':>10}{'min':>10}{'max':>10}"
        f"{'/min':>10}{'/min, 2nd half':>16}"
    )
    for key, figures in summary.items():
        print(
            f"{key:<18}{figures['first']:>10.1f}{figures['last']:>10.1f}{figures['min']:>10.1f}"
            f"{figures['max']:>10.1f}{figures['slope_per_min']:>10.3f}"
            f"{figures['second_half_slope_per_min']:>16.3f}"
        )
    for name, row in (("idle before", idle_before), ("idle after", idle_after)):
        print(
            f"{name}: rss {row['rss_mib']:.1f} MiB, {row['open_files']} files, "
            f"{row['threads']} threads, {row['tasks']} tasks, "
            f"{row['plugin_instances']} plugin instances"
        )
    verdict = all(flat.values()) and stored >= sent and exit_code == 0
    print(f"flat: {flat}; exit code {exit_code}; {'OK' if verdict else 'NOT FLAT'}")
    print(f"results written to {args.output}")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
