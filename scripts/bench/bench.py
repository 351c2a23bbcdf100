"""One benchmark environment: broker, database, config files, the gateway under test."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.bench.database import Database
from scripts.bench.processes import proc_stats, start_profiler
from scripts.bench.sampling import Series
from tests.harness import PrivateMosquitto, free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]


def free_ports(count: int) -> int:
    """Return a base port such that ``base .. base + count - 1`` are all free on loopback."""
    for _ in range(100):
        base = free_port()
        if base + count > 65536:
            continue
        with ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise RuntimeError(f"no {count} consecutive free ports on loopback")


@dataclass
class Gateway:
    """A running ``flux run`` and the HTTP ports of its workers."""

    process: subprocess.Popen[bytes]
    ports: list[int]

    def stats(self) -> dict[str, Any]:
        stats = proc_stats(self.process.pid)
        return {
            "cpu_s": round(stats["cpu_s"], 2),
            "peak_rss_mib": round(stats["peak_rss_mib"], 1),
        }

    def metrics(self) -> dict[str, Any]:
        return gateway_metrics(self.ports)

    def ready_body(self) -> str:
        """What each worker's /ready says (for a failure message)."""
        bodies = []
        for port in self.ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as resp:
                    bodies.append(resp.read().decode())
            except urllib.error.HTTPError as exc:
                bodies.append(exc.read().decode())
            except OSError as exc:
                bodies.append(repr(exc))
        return " ".join(bodies)


def gateway_metrics(ports: list[int]) -> dict[str, Any]:
    """Pool hit ratio, rule evaluation cost and store commit cost from /metrics, summed over
    the workers."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    per_rule: dict[str, float] = {}
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
        except OSError as exc:
            return {"metrics_error": f"port {port}: {exc}"}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "flux_rule_evaluations_total":
                    rule = sample.labels.get("rule", "")
                    per_rule[rule] = per_rule.get(rule, 0.0) + sample.value
                elif sample.labels.get("operation", "write_batch") == "write_batch":
                    sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    hits = sums.get("flux_plugin_pool_hits_total", 0.0)
    misses = sums.get("flux_plugin_pool_misses_total", 0.0)
    eval_sum = sums.get("flux_rule_eval_seconds_sum", 0.0)
    eval_count = sums.get("flux_rule_eval_seconds_count", 0.0)
    write_sum = sums.get("flux_db_query_duration_seconds_sum", 0.0)
    write_count = sums.get("flux_db_query_duration_seconds_count", 0.0)
    rows = sums.get("flux_db_batch_size_sum", 0.0)
    batches = sums.get("flux_db_batch_size_count", 0.0)
    events = max(per_rule.values(), default=0.0)
    return {
        "pool_hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
        "rule_eval_us_per_event": round(eval_sum / events * 1e6, 2) if events else None,
        "rule_eval_us_per_batch": round(eval_sum / eval_count * 1e6, 1) if eval_count else None,
        "rule_batch_events": round(events / eval_count, 1) if eval_count else None,
        "store_commit_ms": round(write_sum / write_count * 1e3, 2) if write_count else None,
        "store_batch_events": round(rows / batches, 1) if batches else None,
    }


@dataclass
class Bench:
    """One benchmark environment: a temp dir, the current broker and database, the plot data."""

    args: argparse.Namespace
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="flux-bench-")))
    broker: PrivateMosquitto | None = None
    db: Database | None = None
    http_port: int = 0
    series: list[Series] = field(default_factory=list)
    profile_each: bool = False
    #: Upstream brokers of the forwarding scenarios (stopped with the bench).
    upstreams: list[PrivateMosquitto] = field(default_factory=list)

    def new_broker(self) -> PrivateMosquitto:
        """Replace the broker with a fresh one: no session or queue of an earlier run survives.

        By default it runs with the configuration of flux's embedded Mosquitto (what the
        shipped config.toml starts when no broker answers); ``--broker stock`` with
        Mosquitto's own defaults (Receive Maximum 20), as an operator's own broker may have.
        """
        self.close_broker()
        self.broker = PrivateMosquitto(persistent=True, as_embedded=self.args.broker == "embedded")
        self.broker.start()
        wait_port("127.0.0.1", self.broker.port)
        return self.broker

    def close_broker(self) -> None:
        if self.broker is not None:
            self.broker.cleanup()
            self.broker = None
        for upstream in self.upstreams:
            upstream.cleanup()
        self.upstreams.clear()

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

    def shipped_config(
        self, workers: int = 1, *, extra_rules: str = "", **overrides: dict[str, Any]
    ) -> Path:
        """The shipped ``config.toml``, ``rules/`` and ``plugins/`` as they are, changed only
        where the bench must: its broker, database, ports and module cache (plus
        ``extra_rules``, a rule file beside the shipped ones, and ``overrides``)."""
        sections = tomllib.loads((ROOT / "config.toml").read_text())
        rules = ROOT / "rules"
        if extra_rules:
            rules = self.workdir / "shipped-rules"
            shutil.rmtree(rules, ignore_errors=True)
            shutil.copytree(ROOT / "rules", rules)
            (rules / "bench-extra.toml").write_text(extra_rules)
        return self.config(
            workers,
            base=sections,
            rules={"dir": str(rules)},
            plugins={"dir": str(ROOT / "plugins"), "cache_dir": str(self.workdir / "modules")},
            **overrides,
        )

    def config(
        self,
        workers: int = 1,
        *,
        base: dict[str, dict[str, Any]] | None = None,
        **overrides: dict[str, Any],
    ) -> Path:
        """Write the gateway's config for the current broker and database; pick free ports.

        ``base`` (the shipped configuration) replaces the bench's own settings of the
        eventbus, batch size, rules and plugins; broker, database and ports stay the bench's.
        """
        assert self.broker is not None and self.db is not None
        self.http_port = free_ports(workers)
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
            "database": {"url": self.db.url, "batch_size": self.args.batch_size},
            "rules": {"dir": str(self.rules_dir())},
            "plugins": {"dir": str(self.plugins_dir()), "cache_dir": str(self.workdir / "modules")},
        }
        if base is not None:
            own = {
                "server": ("port",),
                "metrics": ("port",),
                "mqtt": ("url", "client_id", "embedded"),
                "database": ("url",),
            }
            merged = {name: dict(values) for name, values in base.items()}
            for name, keys in own.items():
                merged.setdefault(name, {}).update({k: sections[name][k] for k in keys})
            sections = merged
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
    def gateway(self, config: Path, *, workers: int = 1, profile_as: str = "") -> Iterator[Gateway]:
        """Run ``flux run`` (with ``--workers`` when more than one) until the block ends.

        ``profile_as`` names a measured start: it is profiled when ``--profile`` is given.
        """
        command = [sys.executable, "-m", "flux", "--log-level", "WARNING", "run"]
        command += ["--config", str(config)]
        if workers > 1:
            command += ["--workers", str(workers)]
        log = open(self.workdir / "gateway.log", "ab")  # noqa: SIM115 - closed below
        process = subprocess.Popen(command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        handle = Gateway(process, [self.http_port + i for i in range(workers)])
        profiler = None
        try:
            self._wait_ready(handle)
            if self.args.profile and profile_as:
                output = Path(self.args.profile)
                if self.profile_each:
                    output = output.with_name(f"{output.stem}-{profile_as}{output.suffix}")
                profiler = start_profiler(process.pid, str(output), workers > 1)
            yield handle
        finally:
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(60)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            log.close()

    def _wait_ready(self, gateway: Gateway, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for port in gateway.ports:
            while True:
                if gateway.process.poll() is not None:
                    raise RuntimeError(
                        f"gateway exited early; see {self.workdir}/gateway.log:\n" + self.log_tail()
                    )
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"gateway not ready on port {port} in time") from None
                    time.sleep(0.05)

    def log_tail(self, lines: int = 15) -> str:
        with suppress(OSError):
            text = (self.workdir / "gateway.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""


@dataclass
class Run:
    """One scenario to run: its name, the ids that asked for it and whether P8 forced PostgreSQL."""

    scenario: str
    ids: list[str] = field(default_factory=list)
    postgres: bool = False
    #: ``--workers`` (the workers scenario picks its own counts and leaves this at 1).
    workers: int = 1

    @property
    def label(self) -> str:
        """Names the run in the plot and profile files: ``drain-pg-2w``."""
        pg = "-pg" if self.postgres else ""
        return f"{self.scenario}{pg}" + (f"-{self.workers}w" if self.workers > 1 else "")
