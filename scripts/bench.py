"""Load-test a real gateway process on loopback and report throughput, latency and memory.

Driven by ``scripts/benchmark.sh``. Every scenario starts ``flux run`` as a child process on
a temporary config, with a private Mosquitto on a free port, and is bounded in count and
time. Scenarios:

- ``drain`` (P1): a QoS 1 backlog is preloaded into the gateway's persistent session while
  the gateway is stopped (so the publishers' CPU does not compete), then the gateway is
  started and the time to commit the whole backlog is measured.
- ``latency`` (P2): a paced QoS 1 stream; publish -> visible-in-database latency per message,
  observed by polling the database every 2 ms.
- ``http`` (P4): POST /api/v1/event from many keep-alive connections, then the batch endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import PrivateMosquitto, free_port, telemetry, wait_port  # noqa: E402


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _proc_stats(pid: int) -> dict[str, float]:
    """Peak RSS (MiB) and CPU seconds of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {"peak_rss_mib": hwm / 1024, "cpu_s": (int(fields[11]) + int(fields[12])) / ticks}


@dataclass
class Bench:
    """One benchmark environment: a private broker, a temp dir and the gateway's config."""

    args: argparse.Namespace
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="flux-bench-")))
    broker: PrivateMosquitto | None = None
    http_port: int = 0

    def rules_dir(self) -> Path:
        """Write ``--rules`` generated threshold rules (alert on a rare match) for the run."""
        folder = self.workdir / "rules"
        folder.mkdir(exist_ok=True)
        lines = []
        for i in range(self.args.rules):
            lines += [
                "[[rules]]",
                f'id = "bench-{i}"',
                'topic = "devices/+/telemetry"',
                f'when = "temperature > {30 + i % 5} and humidity < {20 + i % 7}"',
                'actions = [{ type = "alert", severity = "info" }]',
                "",
            ]
        (folder / "bench.toml").write_text("\n".join(lines))
        return folder

    def plugins_dir(self) -> Path:
        """An empty plugins folder, or one holding the shipped ``--plugin``."""
        folder = self.workdir / "plugins"
        folder.mkdir(exist_ok=True)
        if self.args.plugin and not (folder / self.args.plugin).exists():
            shutil.copytree(ROOT / "plugins" / self.args.plugin, folder / self.args.plugin)
        return folder

    def config(self, **overrides: dict[str, Any]) -> Path:
        assert self.broker is not None
        self.http_port = free_port()
        db_url = self.args.database_url or f"sqlite+aiosqlite:///{self.workdir}/bench.db"
        sections: dict[str, dict[str, Any]] = {
            "server": {"port": self.http_port},
            "metrics": {"port": 0},
            "mqtt": {
                "url": f"mqtt://127.0.0.1:{self.broker.port}",
                "client_id": "flux-bench",
                "topics": ["devices/#"],
                "qos": self.args.qos,
                "embedded": "off",
            },
            "eventbus": {"capacity": self.args.capacity},
            "database": {"url": db_url, "batch_size": self.args.batch_size},
            "rules": {"dir": str(self.rules_dir())},
            "plugins": {"dir": str(self.plugins_dir()), "cache_dir": str(self.workdir / "modules")},
        }
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        path = self.workdir / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    @contextmanager
    def gateway(self, config: Path) -> Iterator[subprocess.Popen[bytes]]:
        log = open(self.workdir / "gateway.log", "ab")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flux",
                "--log-level",
                "WARNING",
                "run",
                "--config",
                str(config),
            ],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready(process)
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            log.close()

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"gateway exited early; see {self.workdir}/gateway.log")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/ready", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("gateway not ready in time")

    def db_count(self) -> int:
        url = self.args.database_url
        if url:
            return _pg_count(url)
        with sqlite3.connect(self.workdir / "bench.db", timeout=30) as conn:
            return int(conn.execute("SELECT count(*) FROM events WHERE hops = 0").fetchone()[0])

    def reset_db(self) -> None:
        if self.args.database_url:
            _pg_execute(self.args.database_url, "TRUNCATE events, devices, dead_letters")
        else:
            for suffix in ("", "-wal", "-shm"):
                (self.workdir / f"bench.db{suffix}").unlink(missing_ok=True)


def _pg_execute(url: str, sql: str) -> Any:
    import asyncpg

    async def run() -> Any:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def _pg_count(url: str) -> int:
    return int(_pg_execute(url, "SELECT count(*) FROM events WHERE hops = 0"))


def _publisher(port: int, device: str, count: int, qos: int, barrier: Any) -> None:
    """One device process: publish ``count`` sequence-numbered messages and wait for PUBACKs."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{device}")
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    barrier.wait()
    topic = f"devices/{device}/telemetry"
    infos = []
    for seq in range(count):
        payload = telemetry(seq)
        infos.append(client.publish(topic, payload, qos=qos))
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def preload(port: int, total: int, publishers: int, qos: int) -> float:
    """Publish ``total`` messages from ``publishers`` processes; return the publish rate."""
    per = total // publishers
    barrier = multiprocessing.Barrier(publishers + 1)
    processes = [
        multiprocessing.Process(target=_publisher, args=(port, f"bench-{i}", per, qos, barrier))
        for i in range(publishers)
    ]
    for process in processes:
        process.start()
    barrier.wait()
    started = time.perf_counter()
    for process in processes:
        process.join(300)
    return per * publishers / (time.perf_counter() - started)


def scenario_drain(bench: Bench) -> dict[str, Any]:
    args = bench.args
    bench.reset_db()
    config = bench.config()
    with bench.gateway(config):  # creates the persistent session and its subscription
        pass
    publish_rate = preload(bench.broker.port, args.messages, args.publishers, args.qos)  # type: ignore[union-attr]
    total = args.messages // args.publishers * args.publishers
    with bench.gateway(config) as process:
        first_at = None
        start_count = 0
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            count = bench.db_count()
            now = time.perf_counter()
            if first_at is None and count > 0:
                first_at, start_count = now, count
            if count >= total:
                break
            time.sleep(0.02)
        finished = time.perf_counter()
        stats = _proc_stats(process.pid)
    if first_at is None or count < total:
        raise RuntimeError(f"drain incomplete: {count}/{total} stored")
    seconds = finished - first_at
    return {
        "scenario": "drain",
        "messages": total,
        "qos": args.qos,
        "events_per_s": round((total - start_count) / seconds),
        "seconds": round(seconds, 2),
        "preload_publish_rate": round(publish_rate),
        "cpu_s": round(stats["cpu_s"], 2),
        "peak_rss_mib": round(stats["peak_rss_mib"], 1),
    }


def scenario_latency(bench: Bench) -> dict[str, Any]:
    args = bench.args
    bench.reset_db()
    config = bench.config()
    total = int(args.rate * args.duration)
    sent: dict[int, float] = {}
    seen: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:
        last = 0
        conn = sqlite3.connect(bench.workdir / "bench.db", timeout=30)
        while not stop.is_set():
            rows = conn.execute(
                "SELECT rowid, payload FROM events WHERE rowid > ? ORDER BY rowid", (last,)
            ).fetchall()
            now = time.perf_counter()
            for rowid, payload in rows:
                seen.setdefault(orjson.loads(payload)["seq"], now)
                last = rowid
            time.sleep(0.002)
        conn.close()

    with bench.gateway(config) as process:
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-latency")
        client.max_inflight_messages_set(10_000)
        client.connect("127.0.0.1", bench.broker.port)  # type: ignore[union-attr]
        client.loop_start()
        interval = 1 / args.rate
        started = time.perf_counter()
        for seq in range(total):
            target = started + seq * interval
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent[seq] = time.perf_counter()
            client.publish(
                "devices/latency/telemetry",
                orjson.dumps({"seq": seq, "temperature": 21.5}),
                qos=args.qos,
            )
        achieved = total / (time.perf_counter() - started)
        deadline = time.monotonic() + 30
        while len(seen) < total and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        watcher.join()
        client.disconnect()
        client.loop_stop()
        stats = _proc_stats(process.pid)
    latencies = [(seen[s] - sent[s]) * 1000 for s in sent if s in seen]
    return {
        "scenario": "latency",
        "rate": args.rate,
        "achieved_rate": round(achieved),
        "messages": total,
        "stored": len(latencies),
        "p50_ms": round(_percentile(latencies, 50), 2),
        "p95_ms": round(_percentile(latencies, 95), 2),
        "p99_ms": round(_percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2),
        "peak_rss_mib": round(stats["peak_rss_mib"], 1),
    }


async def _http_load(
    port: int, path: str, body: bytes, requests: int, concurrency: int, token: str = ""
) -> tuple[list[float], int]:
    """Keep-alive HTTP/1.1 clients on raw sockets (cheap enough not to be the bottleneck)."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{auth}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    failures = 0
    remaining = requests

    async def worker() -> None:
        nonlocal remaining, failures
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - started) * 1000)
            if status != 201:
                failures += 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, failures


def scenario_http(bench: Bench) -> dict[str, Any]:
    args = bench.args
    bench.reset_db()
    config = bench.config()
    single = orjson.dumps({"topic": "devices/http-1/telemetry", "payload": {"temperature": 22.5}})
    batch = orjson.dumps(
        [
            {
                "topic": f"devices/http-{i % 10}/telemetry",
                "payload": {"temperature": 22.5, "seq": i},
            }
            for i in range(100)
        ]
    )
    with bench.gateway(config) as process:
        started = time.perf_counter()
        latencies, failures = asyncio.run(
            _http_load(
                bench.http_port, "/api/v1/event", single, args.http_requests, args.http_concurrency
            )
        )
        single_rate = len(latencies) / (time.perf_counter() - started)
        batch_requests = max(10, args.http_requests // 100)
        started = time.perf_counter()
        batch_latencies, batch_failures = asyncio.run(
            _http_load(bench.http_port, "/api/v1/events", batch, batch_requests, 4)
        )
        batch_rate = len(batch_latencies) * 100 / (time.perf_counter() - started)
        stats = _proc_stats(process.pid)
    return {
        "scenario": "http",
        "requests": len(latencies),
        "concurrency": args.http_concurrency,
        "failures": failures + batch_failures,
        "req_per_s": round(single_rate),
        "p50_ms": round(_percentile(latencies, 50), 2),
        "p95_ms": round(_percentile(latencies, 95), 2),
        "p99_ms": round(_percentile(latencies, 99), 2),
        "batch_events_per_s": round(batch_rate),
        "batch_p95_ms": round(_percentile(batch_latencies, 95), 2),
        "peak_rss_mib": round(stats["peak_rss_mib"], 1),
    }


SCENARIOS = {"drain": scenario_drain, "latency": scenario_latency, "http": scenario_http}


def _versions() -> dict[str, str]:
    names = [
        "flux-gateway",
        "gmqtt",
        "sqlalchemy",
        "aiosqlite",
        "fastapi",
        "uvicorn",
        "orjson",
        "paho-mqtt",
        "lupa",
        "wasmtime",
        "uvloop",
    ]
    found = {"python": platform.python_version()}
    for name in names:
        with suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False)
    found["mosquitto"] = mosquitto.stdout.splitlines()[0] if mosquitto.stdout else "?"
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default="drain,latency,http",
        help="comma-separated scenarios: drain, latency, http",
    )
    parser.add_argument("--messages", type=int, default=100_000, help="backlog size for drain")
    parser.add_argument("--publishers", type=int, default=4, help="publisher processes (drain)")
    parser.add_argument("--qos", type=int, default=1, choices=[0, 1])
    parser.add_argument("--rate", type=float, default=5000, help="paced rate for latency (msg/s)")
    parser.add_argument("--duration", type=float, default=10, help="seconds of paced load")
    parser.add_argument("--http-requests", type=int, default=20_000)
    parser.add_argument("--http-concurrency", type=int, default=100)
    parser.add_argument("--capacity", type=int, default=1024, help="eventbus.capacity")
    parser.add_argument("--batch-size", type=int, default=500, help="database.batch_size")
    parser.add_argument("--rules", type=int, default=10, help="generated rules (0 = none)")
    parser.add_argument(
        "--plugin", default="enrich", help="shipped plugin to run on telemetry ('' = none)"
    )
    parser.add_argument("--database-url", default="", help="PostgreSQL URL instead of SQLite")
    parser.add_argument("--timeout", type=float, default=300, help="cap per scenario (s)")
    parser.add_argument("--output", default="bench-results.json")
    args = parser.parse_args()
    if shutil.which("mosquitto") is None:
        print("benchmark.sh needs mosquitto on PATH (Debian: apt-get install mosquitto)")
        return 2
    bench = Bench(args=args)
    bench.broker = PrivateMosquitto(persistent=True)
    bench.broker.start()
    wait_port("127.0.0.1", bench.broker.port)
    results: list[dict[str, Any]] = []
    try:
        for name in [part.strip() for part in args.only.split(",") if part.strip()]:
            print(f"-- {name} ...", flush=True)
            result = SCENARIOS[name](bench)
            print("   " + json.dumps(result), flush=True)
            results.append(result)
    finally:
        bench.broker.cleanup()
    report = {
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": _versions(),
        "settings": vars(args),
        "results": results,
    }
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nmachine: {report['machine']['cpu']}, {report['machine']['cores']} cores")
    for result in results:
        print(" | ".join(f"{key}={value}" for key, value in result.items()))
    print(f"results written to {args.output}")
    shutil.rmtree(bench.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
