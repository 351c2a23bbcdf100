"""Load-test a real gateway process on loopback: throughput, latency, memory, pools, rules.

Driven by ``scripts/benchmark.sh``. Every scenario starts ``flux run`` as a child process on
a temporary config, with a private Mosquitto of its own on a free port (a fresh one per
scenario, so no session or queue of one scenario reaches the next), and is bounded in count
and time (``--timeout`` caps each wait).

Scenarios (``--only`` takes names or the issue's ids P1..P8, S1, S2, comma-separated, in
that order; ids that name the same run are run once). The broker is configured as flux's
embedded Mosquitto (``--broker stock``: Mosquitto's defaults):

- ``drain`` (P1, P3, P5): a QoS 1 backlog (``--messages`` from ``--publishers`` processes) is
  queued in the gateway's persistent session while the gateway is stopped (so the
  publishers' CPU does not compete), then the gateway starts and the time from the first to
  the last commit is measured. QoS 0 is refused: a broker does not queue QoS 0 messages for
  an offline session, so there would be no backlog.
- ``shipped`` (S1): the same drain through the shipped ``config.toml``, ``rules/`` and
  ``plugins/`` as they are (only broker, database, ports and module cache are the bench's),
  with a backlog from a fleet of ``--devices`` sensors (``tests.support.FleetDevice``:
  temperatures drift slowly, humidity, battery in percent, ``charging = false``, the
  device's own ``ts``; about 1 message in 10 trips a shipped rule that alerts and
  publishes). Reports device messages/s, ``rows_per_s`` (events of every hop plus alerts,
  over the drain's seconds) and the rows of each table: ``dead_letters`` should be 0.
- ``storm`` (S2): ``shipped`` plus one rule that alerts and publishes (QoS 1) for every
  telemetry message; ``mosquitto_sub`` (QoS 1) counts the publishes, and the drain ends
  once every message is stored and every publish received.
- ``latency`` (P2): a paced QoS 1 stream (``--rate`` for ``--duration`` s); publish -> visible
  in the database per message, observed by polling every 2 ms (SQLite by rowid; PostgreSQL
  by the time-ordered event id, looking again just behind the newest id every 20 ms for
  rows committed out of id order, as by several workers: those are ``late_found``).
- ``http`` (P4): POST /api/v1/event from ``--http-concurrency`` keep-alive connections, then
  the batch endpoint with 100 events per request (connections spread over the workers).
- ``workers`` (P7): a live QoS 0 flood (``--messages`` as fast as ``--publishers`` processes
  can publish; QoS 0 whatever ``--qos`` says) against ``flux run`` with 1 worker, then with
  ``max(2, --workers)``, on one shared database. ``events_per_s`` is the stored-count growth
  while the flood lasts, with the publishers' own rate beside it (``publish_rate``: they
  share the machine's cores with the gateway, so on a small machine they may be the limit);
  what the broker buffered is committed afterwards (``catch_up_s``), and
  ``overall_events_per_s`` is all stored over the time to the last commit. The second row
  has both ratios to the first (``vs_1_worker``, ``overall_vs_1_worker``); ``lost`` counts
  QoS 0 messages never stored.
- P8: ``drain`` against PostgreSQL: ``--database-url`` if given, else
  postgresql+asyncpg://127.0.0.1:5432/test if it answers, else skipped with the reason.

PostgreSQL: ``--database-url`` names a server and a database to connect to; the bench
creates a scratch database ``flux_bench_<random>`` there, runs every scenario in it (they
TRUNCATE between runs) and drops it at the end, so the named database is never written.

``--workers N`` passes ``--workers N`` to ``flux run`` (N processes sharing one MQTT shared
subscription; worker i serves HTTP on the configured port + i). CPU seconds and peak RSS are
then summed over the gateway's process tree (the supervisor included; RSS as the sum of each
process's peak), and /metrics is summed over the workers.

Every result row carries, from /metrics at the end of the scenario: ``pool_hit_ratio`` =
plugin pool hits / (hits + misses), and the rule evaluation cost from the
``flux_rule_eval_seconds`` histogram: ``rule_eval_us_per_batch`` (sum / count: one batched
Lua call of all rules over a batch of events) and ``rule_eval_us_per_event`` (sum / events
evaluated, where events evaluated is the largest per-rule ``flux_rule_evaluations_total``:
every generated rule has the same topic filter), and ``rule_batch_events`` (events per
batch); from ``flux_db_query_duration_seconds{operation="write_batch"}`` and
``flux_db_batch_size``: ``store_commit_ms`` (mean time of one batch insert + commit) and
``store_batch_events`` (rows per committed batch). ``null`` where nothing ran.

``--plot FILE.png`` draws committed events/s over time (the stored count is sampled every
50 ms in drain, http and workers, and by the latency watcher) and per-message latency over
send time (needs matplotlib, in the dev extras). ``--profile FILE`` writes py-spy collapsed
stacks of each measured gateway (with several workers, of all of them: ``--subprocesses``);
with more than one measured gateway, FILE gets the run's name before its suffix.
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
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_retention import scenario_retention  # noqa: E402

from tests.support import (  # noqa: E402
    PrivateMosquitto,
    fleet,
    fleet_messages,
    free_port,
    telemetry,
    wait_port,
)

#: Scenario names and the issue's ids for them; ``drain-pg`` is drain on PostgreSQL.
SCENARIO_NAMES = (
    "drain",
    "shipped",
    "storm",
    "latency",
    "http",
    "workers",
    "forward",
    "catchup",
    "retention",
)
IDS = {
    "P1": "drain",
    "P3": "drain",
    "P5": "drain",
    "P2": "latency",
    "P4": "http",
    "P7": "workers",
    "P8": "drain-pg",
    "S1": "shipped",
    "S2": "storm",
    "F1": "forward",
    "F2": "catchup",
}
DEFAULT_PG_URL = "postgresql+asyncpg://127.0.0.1:5432/test"
#: How often the stored count is sampled (drain, http, workers) and latency throughput noted.
SAMPLE_S = 0.05
#: Flood: the count is final when it has not grown for this long after the publishers end.
SETTLE_S = 2.0
#: PostgreSQL latency watcher: how often (s) and how far behind the newest id seen (ms) to
#: look again for rows that committed out of id order (several workers): often and near, and
#: now and then far.
CATCHUPS = ((0.02, 500), (1.0, 10_000))


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


def _process_tree(pid: int) -> list[int]:
    """Return ``pid`` and its descendants (the gateway's workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [pid], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _proc_stats(pid: int) -> dict[str, float]:
    """Peak RSS (MiB, each process's peak, summed) and CPU seconds of a process tree."""
    ticks = os.sysconf("SC_CLK_TCK")
    hwm_kib = cpu_ticks = processes = 0
    for member in _process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        hwm_kib += next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0
        )
        cpu_ticks += int(fields[11]) + int(fields[12])
        processes += 1
    return {"peak_rss_mib": hwm_kib / 1024, "cpu_s": cpu_ticks / ticks, "processes": processes}


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


# -- databases ---------------------------------------------------------------------------------


def _dsn(url: str) -> str:
    """The asyncpg form of a SQLAlchemy ``postgresql+asyncpg://`` URL."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _redact(url: str) -> str:
    """The URL without its password, for the report."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _pg_execute(url: str, sql: str) -> Any:
    """Run one statement on its own connection; return the first value of its result."""
    import asyncpg

    async def run() -> Any:
        conn = await asyncpg.connect(_dsn(url), timeout=5)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


class ScratchPostgres:
    """A database of the bench's own on a PostgreSQL server: created on entry, dropped on exit."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.name = f"flux_bench_{uuid.uuid4().hex[:10]}"
        self.url = _with_database(server_url, self.name)

    def probe(self) -> str:
        """Return why the server cannot be used, or '' when it answers."""
        try:
            _pg_execute(self.server_url, "SELECT 1")
        except Exception as exc:
            where = urlsplit(self.server_url).netloc.rsplit("@", 1)[-1]
            return f"PostgreSQL at {where} does not answer: {exc!r}"
        return ""

    def __enter__(self) -> ScratchPostgres:
        _pg_execute(self.server_url, f'CREATE DATABASE "{self.name}"')
        return self

    def __exit__(self, *exc_info: object) -> None:
        _pg_execute(self.server_url, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


#: Empty every table of the scratch database but the migration version, in one statement.
_TRUNCATE_ALL = """
DO $$ DECLARE names text; BEGIN
  SELECT string_agg(quote_ident(tablename), ', ') INTO names
  FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version';
  IF names IS NOT NULL THEN EXECUTE 'TRUNCATE ' || names; END IF;
END $$
"""


class Reader(Protocol):
    """Reads the events table from one thread on a connection of its own."""

    late: int

    def count(self) -> int: ...

    def new_payloads(self) -> list[Any]: ...

    def close(self) -> None: ...


class SqliteReader:
    """Count stored events and read new ones by rowid (commit order, even with several writers)."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, timeout=30)
        self._last = 0
        self.late = 0

    def count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM events WHERE hops = 0").fetchone()[0])

    def new_payloads(self) -> list[Any]:
        rows = self._conn.execute(
            "SELECT rowid, payload FROM events WHERE hops = 0 AND rowid > ? ORDER BY rowid",
            (self._last,),
        ).fetchall()
        if rows:
            self._last = rows[-1][0]
        return [payload for _, payload in rows]

    def close(self) -> None:
        self._conn.close()


class PostgresReader:
    """Count stored events and read new ones by the time-ordered event id.

    Ids sort by creation time (48-bit milliseconds first) and one writer commits them in
    that order; several workers do not, so the ids just behind the newest one seen are
    looked at again (``CATCHUPS``) and rows missed are returned then, counted in ``late``
    (their latency is late by up to 20 ms).
    """

    def __init__(self, url: str) -> None:
        import asyncpg

        self._loop = asyncio.new_event_loop()
        self._conn = self._loop.run_until_complete(asyncpg.connect(_dsn(url), timeout=10))
        self._last = ""
        self._seen: set[str] = set()
        self._next = [time.monotonic() + every for every, _ in CATCHUPS]
        self.late = 0

    def _fetch(self, sql: str, *params: Any) -> list[Any]:
        return list(self._loop.run_until_complete(self._conn.fetch(sql, *params)))

    def count(self) -> int:
        value = self._loop.run_until_complete(
            self._conn.fetchval("SELECT count(*) FROM events WHERE hops = 0")
        )
        return int(value)

    def new_payloads(self) -> list[Any]:
        rows = self._fetch(
            "SELECT id, payload FROM events WHERE hops = 0 AND id > $1 ORDER BY id", self._last
        )
        if rows:
            self._last = rows[-1]["id"]
        self._seen.update(row["id"] for row in rows)
        now = time.monotonic()
        for i, (every, lookback_ms) in enumerate(CATCHUPS):
            if now < self._next[i] or not self._last:
                continue
            self._next[i] = now + every
            floor = f"{max(0, int(self._last[:12], 16) - lookback_ms):012x}"
            ids = self._fetch(
                "SELECT id FROM events WHERE hops = 0 AND id > $1 AND id <= $2",
                floor,
                self._last,
            )
            missed = [row["id"] for row in ids if row["id"] not in self._seen]
            if missed:
                late = self._fetch("SELECT id, payload FROM events WHERE id = ANY($1)", missed)
                self._seen.update(row["id"] for row in late)
                self.late += len(late)
                rows += late
        return [row["payload"] for row in rows]

    def close(self) -> None:
        self._loop.run_until_complete(self._conn.close())
        self._loop.close()


@dataclass
class Database:
    """Where one run's gateway stores events: SQLite in the work dir, or a PostgreSQL URL."""

    url: str
    sqlite_path: Path | None = None

    @property
    def kind(self) -> str:
        return "sqlite" if self.sqlite_path is not None else "postgresql"

    def reader(self) -> Reader:
        if self.sqlite_path is not None:
            return SqliteReader(self.sqlite_path)
        return PostgresReader(self.url)

    def count(self) -> int:
        reader = self.reader()
        try:
            return reader.count()
        finally:
            reader.close()

    def table_counts(self) -> dict[str, int]:
        """Rows in the tables a drain writes: events (every hop), alerts, dead letters."""
        tables = ("events", "alerts", "dead_letters")
        if self.sqlite_path is None:
            return {t: int(_pg_execute(self.url, f"SELECT count(*) FROM {t}")) for t in tables}
        with sqlite3.connect(self.sqlite_path, timeout=30) as conn:
            return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables}

    def reset(self) -> None:
        if self.sqlite_path is None:
            _pg_execute(self.url, _TRUNCATE_ALL)  # a no-op before the first migration
            return
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.sqlite_path}{suffix}").unlink(missing_ok=True)


# -- time series for --plot --------------------------------------------------------------------


@dataclass
class Series:
    """Points for the plot: ``count`` (s, stored events) or ``latency`` (send s, latency ms)."""

    label: str
    kind: str
    points: list[tuple[float, float]] = field(default_factory=list)
    #: Times drawn as dashed lines (the end of a flood).
    marks: list[float] = field(default_factory=list)


class CountSampler:
    """Sample the stored-event count every ``SAMPLE_S`` on a thread, into a ``Series``."""

    def __init__(self, db: Database, series: Series) -> None:
        self._db = db
        self.series = series
        self.latest = 0
        self.error: Exception | None = None
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CountSampler:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        try:
            reader = self._db.reader()
            try:
                while True:
                    self.latest = reader.count()
                    now = time.perf_counter()
                    self.series.points.append((now - self.started, self.latest))
                    if self._stop.wait(SAMPLE_S):
                        return
            finally:
                reader.close()
        except Exception as exc:
            self.error = exc

    def check(self) -> None:
        """Raise what stopped the sampler, if anything did."""
        if self.error is not None:
            raise RuntimeError(f"stored-count sampler failed: {self.error!r}") from self.error

    def wait_for(self, total: int, timeout: float) -> bool:
        """Wait until ``total`` events are stored; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.latest < total:
            self.check()
            if time.monotonic() > deadline:
                return False
            time.sleep(SAMPLE_S / 2)
        return True


# -- the gateway -------------------------------------------------------------------------------


@dataclass
class Gateway:
    """A running ``flux run`` and the HTTP ports of its workers."""

    process: subprocess.Popen[bytes]
    ports: list[int]

    def stats(self) -> dict[str, Any]:
        stats = _proc_stats(self.process.pid)
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

    def shipped_config(self, workers: int = 1, *, extra_rules: str = "") -> Path:
        """The shipped ``config.toml``, ``rules/`` and ``plugins/`` as they are, changed only
        where the bench must: its broker, database, ports and module cache (plus
        ``extra_rules``, a rule file beside the shipped ones)."""
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
                profiler = _start_profiler(process.pid, str(output), workers > 1)
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


def _start_profiler(pid: int, output: str, subprocesses: bool) -> subprocess.Popen[bytes]:
    """Sample the gateway with py-spy into ``output`` (collapsed stacks) while it runs."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("--profile needs py-spy on PATH (pip install py-spy)")
    command = [py_spy, "record", "--gil", "--pid", str(pid), "--format", "raw", "--rate", "250"]
    command += ["-o", output] + (["--subprocesses"] if subprocesses else [])
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- load generators ---------------------------------------------------------------------------


def _publisher(port: int, device: str, count: int, qos: int, barrier: Any) -> None:
    """One device process: publish ``count`` sequence-numbered messages, wait until sent/acked."""
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


def publish(port: int, total: int, publishers: int, qos: int) -> tuple[float, float, float]:
    """Publish ``total`` messages from ``publishers`` processes: (rate, started, finished).

    The processes are spawned, not forked: the bench has sampler threads by then.
    """
    per = total // publishers
    started, finished = _run_publishers(
        _publisher, [(port, f"bench-{i}", per, qos) for i in range(publishers)]
    )
    return per * publishers / (finished - started), started, finished


def _run_publishers(
    target: Callable[..., None], args: list[tuple[Any, ...]]
) -> tuple[float, float]:
    """Run one spawned process per ``args`` (each gets a start barrier as its last argument),
    release them together, wait for them; return when they started and finished."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(args) + 1)
    processes = [context.Process(target=target, args=(*each, barrier)) for each in args]
    for process in processes:
        process.start()
    barrier.wait(120)
    started = time.perf_counter()
    for process in processes:
        process.join(300)
        if process.is_alive():
            process.kill()
    return started, time.perf_counter()


def _fleet_publisher(port: int, indexes: list[int], per_device: int, barrier: Any) -> None:
    """One publisher process: ``per_device`` readings of each fleet device in ``indexes``."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-fleet-{indexes[0]}")
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    devices = [d for d in fleet(max(indexes) + 1, per_device) if d.index in set(indexes)]
    messages = fleet_messages(devices, per_device)
    barrier.wait()
    infos = [client.publish(topic, orjson.dumps(body), qos=1) for topic, body in messages]
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def publish_fleet(port: int, devices: int, per_device: int, publishers: int) -> float:
    """Publish ``per_device`` QoS 1 readings of ``devices`` fleet devices; return msg/s."""
    publishers = min(publishers, devices)
    started, finished = _run_publishers(
        _fleet_publisher,
        [(port, list(range(i, devices, publishers)), per_device) for i in range(publishers)],
    )
    return devices * per_device / (finished - started)


class PublishCounter:
    """Counts what the gateway publishes on a topic filter, and the distinct (device, seq)
    pairs among the messages, through ``mosquitto_sub`` (C, a process of its own: a Python
    subscriber took a good share of the 2 cores from the gateway it measured)."""

    PROBE = b'{"device": "bench-probe", "seq": -1}'

    def __init__(self, port: int, topic: str, *, by_topic: bool = False) -> None:
        self._port = port
        self._topic = topic
        #: Tell messages apart by (topic, seq) instead of the body's (device, seq).
        self._by_topic = by_topic
        self._seen: set[tuple[Any, Any]] = set()
        self._received = 0
        self.last_at = 0.0
        self._process: subprocess.Popen[bytes] | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> PublishCounter:
        command = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(self._port), "-q", "1"]
        output = "%t %p" if self._by_topic else "%p"
        command += ["-t", self._topic, "-F", output, "-i", f"bench-counter-{os.getpid()}"]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE)
        self._reader.start()
        # Subscribed once a probe published on the filter comes back.
        probe_topic = self._topic.replace("#", "bench-probe").replace("+", "bench-probe")
        probe_key: tuple[Any, Any] = (probe_topic, -1) if self._by_topic else ("bench-probe", -1)
        deadline = time.monotonic() + 30
        while probe_key not in self._seen:
            if time.monotonic() > deadline:
                raise RuntimeError("the publish counter did not subscribe within 30 s")
            subprocess.run(
                ["mosquitto_pub", "-p", str(self._port), "-t", probe_topic, "-m", self.PROBE],
                check=True,
            )
            time.sleep(0.2)
        self._seen.discard(probe_key)
        self._received = 0
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self._received += 1
            try:
                if self._by_topic:
                    topic, _, payload = line.partition(b" ")
                    key = (topic.decode(), orjson.loads(payload).get("seq"))
                else:
                    body = orjson.loads(line)
                    key = (body.get("device"), body.get("seq"))
            except (orjson.JSONDecodeError, AttributeError, UnicodeDecodeError):
                continue
            if key not in self._seen:
                self._seen.add(key)
                self.last_at = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
        self._reader.join(10)

    def received(self) -> int:
        return self._received

    def unique(self) -> int:
        return len(self._seen)

    def wait_for(self, total: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.unique() < total:
            if time.monotonic() > deadline or (self._process and self._process.poll() is not None):
                return False
            time.sleep(SAMPLE_S / 2)
        return True


# -- scenarios ---------------------------------------------------------------------------------


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


def scenario_drain(bench: Bench, run: Run) -> list[dict[str, Any]]:
    args = bench.args
    assert bench.db is not None
    if args.qos == 0:
        return [{"skipped": "a QoS 0 backlog is not queued for an offline session; see workers"}]
    broker = bench.new_broker()
    bench.db.reset()
    config = bench.config(args.workers)
    total = args.messages // args.publishers * args.publishers
    return [
        _drain(
            bench,
            run,
            config,
            total,
            lambda: publish(broker.port, args.messages, args.publishers, args.qos)[0],
        )
    ]


def _drain(
    bench: Bench,
    run: Run,
    config: Path,
    total: int,
    preload: Callable[[], float],
    counter: PublishCounter | None = None,
) -> dict[str, Any]:
    """Queue a backlog in the gateway's persistent session while it is stopped, then start
    it and time the drain: from the first commit until ``total`` device messages are stored
    (and, with a ``counter``, until it has received every publish the drain caused)."""
    args = bench.args
    assert bench.db is not None
    with bench.gateway(config, workers=args.workers):  # creates the sessions and subscriptions
        pass
    publish_rate = preload()
    series = Series(run.label, "count")
    with (
        bench.gateway(config, workers=args.workers, profile_as=run.label) as gateway,
        CountSampler(bench.db, series) as sampler,
    ):
        done = sampler.wait_for(total, args.timeout)
        if done and counter is not None:
            done = counter.wait_for(total, args.timeout)
        stats = gateway.stats()
        metrics = gateway.metrics()
        if not done:
            received = f", {counter.unique()}/{total} publishes received" if counter else ""
            raise RuntimeError(
                f"drain incomplete: {sampler.latest}/{total} stored{received} after "
                f"{args.timeout} s; /ready: {gateway.ready_body()}\n"
                f"gateway log:\n{bench.log_tail()}"
            )
    bench.series.append(series)
    stored = [(t, count) for t, count in series.points if count > 0]
    first_at, start_count = stored[0]
    finished = next(t for t, count in stored if count >= total)
    if counter is not None:
        finished = max(finished, counter.last_at - sampler.started)
    seconds = max(finished - first_at, SAMPLE_S)
    tables = bench.db.table_counts()
    row: dict[str, Any] = {
        "messages": total,
        "qos": args.qos,
        "events_per_s": round((total - start_count) / seconds),
        "rows_per_s": round((tables["events"] + tables["alerts"]) / seconds),
        "seconds": round(seconds, 2),
        **tables,
    }
    if counter is not None:
        row["publishes_received"] = counter.received()
        row["publishes_unique"] = counter.unique()
    return {**row, "preload_publish_rate": round(publish_rate), **stats, **metrics}


#: The ``storm`` scenario's rule: an alert and a QoS 1 publish for every telemetry message.
STORM_RULE = """
[[rules]]
id = "storm"
description = "benchmark: alert and publish for every telemetry message"
topic = "devices/+/telemetry"
when = "true"

[[rules.actions]]
type = "alert"
severity = "info"

[[rules.actions]]
type = "publish"
topic = "storm/{device_id}"
qos = 1
payload = { device = "{device_id}", seq = "{payload.seq}" }
"""


def _fleet_drain(bench: Bench, run: Run, extra_rules: str = "") -> dict[str, Any]:
    """Drain a fleet backlog through the shipped configuration (plus ``extra_rules``)."""
    args = bench.args
    assert bench.db is not None
    broker = bench.new_broker()
    bench.db.reset()
    config = bench.shipped_config(args.workers, extra_rules=extra_rules)
    per_device = max(1, args.messages // args.devices)
    total = per_device * args.devices
    preload = partial(publish_fleet, broker.port, args.devices, per_device, args.publishers)
    if not extra_rules:
        return _drain(bench, run, config, total, preload)
    with PublishCounter(broker.port, "storm/#") as counter:
        return _drain(bench, run, config, total, preload, counter)


def scenario_shipped(bench: Bench, run: Run) -> list[dict[str, Any]]:
    return [{"devices": bench.args.devices, **_fleet_drain(bench, run)}]


def scenario_storm(bench: Bench, run: Run) -> list[dict[str, Any]]:
    return [{"devices": bench.args.devices, **_fleet_drain(bench, run, STORM_RULE)}]


def scenario_latency(bench: Bench, run: Run) -> list[dict[str, Any]]:
    args = bench.args
    db = bench.db
    assert db is not None
    broker = bench.new_broker()
    db.reset()
    config = bench.config(args.workers)
    total = int(args.rate * args.duration)
    sent: dict[int, float] = {}
    seen: dict[int, float] = {}
    counts = Series(run.label, "count")
    stop = threading.Event()
    late = 0

    errors: list[Exception] = []

    def watch() -> None:
        nonlocal late
        next_sample = 0.0
        try:
            reader = db.reader()
            try:
                while not stop.is_set():
                    payloads = reader.new_payloads()
                    now = time.perf_counter()
                    for payload in payloads:
                        seq = orjson.loads(payload).get("seq")
                        if isinstance(seq, int):
                            seen.setdefault(seq, now)
                    if now >= next_sample:
                        counts.points.append((now - ready_at, len(seen)))
                        next_sample = now + SAMPLE_S
                    time.sleep(0.002)
            finally:
                late = reader.late
                reader.close()
        except Exception as exc:
            errors.append(exc)

    with bench.gateway(config, workers=args.workers, profile_as=run.label) as gateway:
        ready_at = time.perf_counter()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-latency")
        client.max_inflight_messages_set(10_000)
        client.connect("127.0.0.1", broker.port)
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
        deadline = time.monotonic() + min(30, args.timeout)
        while len(seen) < total and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        watcher.join(30)
        if errors:
            raise RuntimeError(f"latency watcher failed: {errors[0]!r}") from errors[0]
        client.disconnect()
        client.loop_stop()
        stats = gateway.stats()
        metrics = gateway.metrics()
    latencies = [(seen[s] - sent[s]) * 1000 for s in sent if s in seen]
    bench.series.append(counts)
    bench.series.append(
        Series(
            run.label,
            "latency",
            [(sent[s] - started, (seen[s] - sent[s]) * 1000) for s in sent if s in seen],
        )
    )
    result: dict[str, Any] = {
        "rate": args.rate,
        "achieved_rate": round(achieved),
        "messages": total,
        "stored": len(latencies),
        "p50_ms": round(_percentile(latencies, 50), 2),
        "p95_ms": round(_percentile(latencies, 95), 2),
        "p99_ms": round(_percentile(latencies, 99), 2),
        "max_ms": round(max(latencies, default=float("nan")), 2),
    }
    if db.kind == "postgresql":
        result["late_found"] = late
    return [{**result, **stats, **metrics}]


async def _http_load(
    ports: list[int], path: str, body: bytes, requests: int, concurrency: int, token: str = ""
) -> tuple[list[float], int]:
    """Keep-alive HTTP/1.1 clients on raw sockets (cheap enough not to be the bottleneck).

    Connection k goes to ``ports[k % len(ports)]``, so the workers share the load.
    """
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{auth}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    failures = 0
    remaining = requests

    async def worker(port: int) -> None:
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

    await asyncio.gather(*(worker(ports[k % len(ports)]) for k in range(concurrency)))
    return latencies, failures


def scenario_http(bench: Bench, run: Run) -> list[dict[str, Any]]:
    args = bench.args
    assert bench.db is not None
    bench.new_broker()
    bench.db.reset()
    config = bench.config(args.workers)
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
    series = Series(run.label, "count")
    with (
        bench.gateway(config, workers=args.workers, profile_as=run.label) as gateway,
        CountSampler(bench.db, series),
    ):
        started = time.perf_counter()
        latencies, failures = asyncio.run(
            _http_load(
                gateway.ports, "/api/v1/event", single, args.http_requests, args.http_concurrency
            )
        )
        single_rate = len(latencies) / (time.perf_counter() - started)
        batch_requests = max(10, args.http_requests // 100)
        started = time.perf_counter()
        batch_latencies, batch_failures = asyncio.run(
            _http_load(gateway.ports, "/api/v1/events", batch, batch_requests, 4)
        )
        batch_rate = len(batch_latencies) * 100 / (time.perf_counter() - started)
        stats = gateway.stats()
        metrics = gateway.metrics()
    bench.series.append(series)
    return [
        {
            "requests": len(latencies),
            "concurrency": args.http_concurrency,
            "failures": failures + batch_failures,
            "req_per_s": round(single_rate),
            "p50_ms": round(_percentile(latencies, 50), 2),
            "p95_ms": round(_percentile(latencies, 95), 2),
            "p99_ms": round(_percentile(latencies, 99), 2),
            "batch_events_per_s": round(batch_rate),
            "batch_p95_ms": round(_percentile(batch_latencies, 95), 2),
            **stats,
            **metrics,
        }
    ]


def _flood(bench: Bench, run: Run, workers: int) -> dict[str, Any]:
    """Publish a QoS 0 flood at a gateway with ``workers`` workers; measure commits meanwhile.

    ``events_per_s`` is what was committed while the publishers ran, over their run time;
    ``overall_events_per_s`` is everything stored over the time to the last commit (what
    the broker and the sockets buffered is committed after the flood, in ``catch_up_s``).
    """
    args = bench.args
    assert bench.db is not None
    broker = bench.new_broker()
    bench.db.reset()
    config = bench.config(workers, mqtt={"qos": 0})
    total = args.messages // args.publishers * args.publishers
    label = f"{run.label}-{workers}w"
    series = Series(label, "count")
    with (
        bench.gateway(config, workers=workers, profile_as=label) as gateway,
        CountSampler(bench.db, series) as sampler,
    ):
        publish_rate, started, finished = publish(broker.port, total, args.publishers, 0)
        during = bench.db.count()  # the database was empty when the flood began
        # Wait for the catch-up: all stored, or no growth for SETTLE_S (QoS 0 may lose some).
        deadline = time.monotonic() + args.timeout
        while sampler.latest < total and time.monotonic() < deadline:
            sampler.check()
            time.sleep(SAMPLE_S)
            grown_at = next(
                (t for t, count in reversed(series.points) if count < sampler.latest),
                0.0,
            )
            if time.perf_counter() - sampler.started - grown_at > SETTLE_S:
                break
        stored = bench.db.count()
        stats = gateway.stats()
        metrics = gateway.metrics()
    # The first sample that saw the final count, and the samples on the flood's clock.
    last_commit = sampler.started + next(
        (t for t, count in series.points if count >= stored), series.points[-1][0]
    )
    offset = started - sampler.started
    series.points = [(t - offset, count) for t, count in series.points]
    series.marks = [finished - started]
    bench.series.append(series)
    flood_s = finished - started
    return {
        "workers": workers,
        "messages": total,
        "qos": 0,
        "events_per_s": round(during / flood_s),
        "publish_rate": round(publish_rate),
        "flood_s": round(flood_s, 2),
        "overall_events_per_s": round(stored / max(last_commit - started, SAMPLE_S)),
        "catch_up_s": round(max(0.0, last_commit - finished), 2),
        "stored": stored,
        "lost": total - stored,
        **stats,
        **metrics,
    }


def _ratio(new: float, old: float) -> float | None:
    return round(new / old, 2) if old else None


def scenario_workers(bench: Bench, run: Run) -> list[dict[str, Any]]:
    first = _flood(bench, run, 1)
    second = _flood(bench, run, max(2, bench.args.workers))
    second["vs_1_worker"] = _ratio(second["events_per_s"], first["events_per_s"])
    second["overall_vs_1_worker"] = _ratio(
        second["overall_events_per_s"], first["overall_events_per_s"]
    )
    return [first, second]


def _upstream(bench: Bench) -> PrivateMosquitto:
    """A second private Mosquitto, the sinks' upstream (a cloud broker allows a wide window:
    it runs with the embedded broker's configuration, Receive Maximum 1,000)."""
    upstream = PrivateMosquitto(persistent=True, as_embedded=True)
    upstream.start()
    wait_port("127.0.0.1", upstream.port)
    bench.upstreams.append(upstream)
    return upstream


def _sink(upstream: PrivateMosquitto) -> dict[str, Any]:
    return {
        "type": "mqtt",
        "url": f"mqtt://127.0.0.1:{upstream.port}",
        "qos": 1,
        "topics": ["devices/+/telemetry"],
    }


def scenario_forward(bench: Bench, run: Run) -> list[dict[str, Any]]:
    """F1: drain a QoS 1 backlog (``drain``'s rules and plugin) while forwarding every
    telemetry message, QoS 1, to an upstream broker; done when the last one arrived there."""
    args = bench.args
    assert bench.db is not None
    broker = bench.new_broker()
    upstream = _upstream(bench)
    bench.db.reset()
    config = bench.config(args.workers, **{"sinks.up": _sink(upstream)})
    total = args.messages // args.publishers * args.publishers
    with PublishCounter(upstream.port, "devices/#", by_topic=True) as counter:
        row = _drain(
            bench,
            run,
            config,
            total,
            lambda: publish(broker.port, args.messages, args.publishers, args.qos)[0],
            counter,
        )
    return [{"forwarded_per_s": row["events_per_s"], **row}]


def scenario_catchup(bench: Bench, run: Run) -> list[dict[str, Any]]:
    """F2: one hour offline at 500 msg/s, simulated: ``--backlog-rows`` outbox rows (1.8M by
    default) are written for the sink while nothing runs, then the gateway starts with the
    upstream up; the backlog's size on disk and the rate at which it empties."""
    args = bench.args
    assert bench.db is not None
    if args.database_url:
        return [{"skipped": "the simulated backlog is written to SQLite only"}]
    bench.new_broker()
    upstream = _upstream(bench)
    bench.db.reset()
    config = bench.config(args.workers, **{"sinks.up": _sink(upstream)})
    with bench.gateway(config):  # migrates the database
        pass
    path = Path(bench.db.url.split("///", 1)[1])
    before = path.stat().st_size
    rows = args.backlog_rows
    _write_backlog(path, rows)
    backlog_mib = (path.stat().st_size - before) / 2**20
    with PublishCounter(upstream.port, "devices/#", by_topic=True) as counter:
        with bench.gateway(config, profile_as=run.label) as gateway:
            started = time.perf_counter()
            done = counter.wait_for(rows, args.timeout)
            finished = counter.last_at
            stats = gateway.stats()
        if not done:
            raise RuntimeError(
                f"catch-up incomplete: {counter.unique()}/{rows} after {args.timeout} s"
            )
    seconds = max(finished - started, SAMPLE_S)
    return [
        {
            "backlog_rows": rows,
            "backlog_mib": round(backlog_mib, 1),
            "bytes_per_row": round(backlog_mib * 2**20 / rows),
            "catchup_per_s": round(rows / seconds),
            "seconds": round(seconds, 1),
            **stats,
        }
    ]


def _write_backlog(path: Path, rows: int) -> None:
    """Write ``rows`` outbox rows of the sink ``up``: 200 devices' telemetry at 500 msg/s,
    as an hour offline would have left them."""
    import sqlite3

    from flux.events import new_event_id

    started = time.time() - rows / 500
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        for start in range(0, rows, 10_000):
            batch = []
            for seq in range(start, min(rows, start + 10_000)):
                at = started + seq / 500
                created = (
                    time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))
                    + f".{int(at % 1 * 1e6):06d}"
                )
                batch.append(
                    (
                        new_event_id(),
                        "up",
                        f"bench-{seq % 200}",
                        f"devices/bench-{seq % 200}/telemetry",
                        telemetry(seq // 200),
                        created,
                        created,
                    )
                )
            conn.executemany(
                "INSERT INTO outbox (id, sink, device_id, topic, payload, qos, retain, hops, "
                "next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, 1, 0, 1, ?, ?)",
                batch,
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


SCENARIOS = {
    "drain": scenario_drain,
    "shipped": scenario_shipped,
    "storm": scenario_storm,
    "latency": scenario_latency,
    "http": scenario_http,
    "workers": scenario_workers,
    "forward": scenario_forward,
    "catchup": scenario_catchup,
    "retention": scenario_retention,
}


def parse_only(text: str, postgres_default: bool) -> list[Run]:
    """Resolve ``--only`` names and ids into runs, in order, each run once.

    ``postgres_default`` is true when ``--database-url`` is given: then every run is on
    PostgreSQL and P8 is the same run as drain.
    """
    runs: dict[tuple[str, bool], Run] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name = IDS.get(part.upper(), part.lower())
        postgres = postgres_default or name == "drain-pg"
        name = name.removesuffix("-pg")
        if name not in SCENARIOS:
            known = ", ".join([*SCENARIO_NAMES, *IDS])
            raise ValueError(f"unknown scenario {part!r} (known: {known})")
        run = runs.setdefault((name, postgres), Run(name, postgres=postgres))
        if part.upper() in IDS:
            run.ids.append(part.upper())
    return list(runs.values())


# -- report ------------------------------------------------------------------------------------


def _rates(points: list[tuple[float, float]], window: float = 0.5) -> tuple[list[float], ...]:
    """Events/s from cumulative counts, over a trailing window of ``window`` s.

    The first points, before half a window has passed, are left out: one batch commit over
    a single 50 ms sample would read as a spike.
    """
    xs: list[float] = []
    ys: list[float] = []
    j = 0
    for i in range(1, len(points)):
        t, count = points[i]
        while j < i - 1 and points[j + 1][0] <= t - window:
            j += 1
        t0, count0 = points[j]
        if t - t0 >= window / 2:
            xs.append(t)
            ys.append((count - count0) / (t - t0))
    return xs, ys


def plot(series: list[Series], path: str, title: str) -> bool:
    """Draw committed events/s and per-message latency over time into ``path`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("--plot needs matplotlib (pip install -e '.[dev]'); no plot written")
        return False
    counts = [s for s in series if s.kind == "count" and len(s.points) > 1]
    latencies = [s for s in series if s.kind == "latency" and s.points]
    panels = int(bool(counts)) + int(bool(latencies))
    if not panels:
        print("--plot: nothing to draw")
        return False
    fig, axes = plt.subplots(panels, 1, figsize=(11, 4 * panels), squeeze=False)
    column = list(axes[:, 0])
    if counts:
        ax = column.pop(0)
        for s in counts:
            xs, ys = _rates(s.points)
            (line,) = ax.plot(xs, ys, label=s.label, linewidth=1.2)
            for mark in s.marks:
                ax.axvline(mark, color=line.get_color(), linestyle="--", linewidth=0.8)
        heading = "events committed per second (0.5 s trailing window)"
        if any(s.marks for s in counts):
            heading += "; dashed: the flood's publishers are done"
        ax.set_title(heading)
        ax.set_xlabel("seconds since the gateway was ready (workers: since the flood began)")
        ax.set_ylabel("events/s")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    if latencies:
        ax = column.pop(0)
        for s in latencies:
            xs = [p[0] for p in s.points]
            ys = [p[1] for p in s.points]
            ax.plot(xs, ys, ".", markersize=1.5, label=f"{s.label} ({len(ys)} messages)")
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_title("publish -> visible in the database, per message")
        ax.set_xlabel("send time (s since the stream began)")
        ax.set_ylabel("latency (ms, log)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper right", fontsize="small", markerscale=6)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _versions() -> dict[str, str]:
    names = [
        "flux-gateway",
        "gmqtt",
        "sqlalchemy",
        "aiosqlite",
        "asyncpg",
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


def _has_workers_flag() -> bool:
    """Whether this flux's ``run`` takes ``--workers``."""
    help_text = subprocess.run(
        [sys.executable, "-m", "flux", "run", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    ).stdout
    return "--workers" in help_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        default="drain,latency,http",
        help="comma-separated scenarios or ids: drain, shipped, storm, latency, http, workers, "
        "retention (scripts/bench_retention.py); "
        "P1/P3/P5=drain, P2=latency, P4=http, P7=workers, P8=drain on PostgreSQL, "
        "S1=shipped, S2=storm, F1=forward, F2=catchup (default: drain,latency,http)",
    )
    parser.add_argument(
        "--messages", type=int, default=100_000, help="backlog (drain) or flood (workers) size"
    )
    parser.add_argument(
        "--publishers", type=int, default=4, help="publisher processes (drain, workers)"
    )
    parser.add_argument(
        "--devices", type=int, default=200, help="fleet size of the shipped and storm scenarios"
    )
    parser.add_argument(
        "--broker",
        choices=["embedded", "stock"],
        default="embedded",
        help="the private Mosquitto's configuration: flux's embedded broker's (default) or "
        "Mosquitto's defaults (max_inflight_messages 20)",
    )
    parser.add_argument("--qos", type=int, default=1, choices=[0, 1], help="drain and latency")
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
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway worker processes (flux run --workers N) for drain, latency and http; "
        "the workers scenario compares 1 with max(2, N)",
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="postgresql+asyncpg://... server to run every scenario on, in a scratch database "
        "created and dropped by the bench (default: SQLite in a temp dir)",
    )
    parser.add_argument(
        "--backlog-rows",
        type=int,
        default=1_800_000,
        help="outbox rows of the catchup scenario (one hour offline at 500 msg/s)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="cap per wait (s)")
    parser.add_argument("--output", default="bench-results.json")
    parser.add_argument(
        "--plot", default="", help="PNG of events/s and latency over time (needs matplotlib)"
    )
    parser.add_argument(
        "--profile",
        default="",
        help="py-spy collapsed stacks of each measured gateway (all workers) to this file",
    )
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    if args.database_url and not args.database_url.startswith("postgresql"):
        parser.error("--database-url takes a PostgreSQL URL (SQLite is the default)")
    if args.workers < 1 or args.publishers < 1 or args.messages < args.publishers:
        parser.error("--workers and --publishers must be >= 1, --messages >= --publishers")
    try:
        runs = parse_only(args.only, bool(args.database_url))
    except ValueError as exc:
        parser.error(str(exc))
    if shutil.which("mosquitto") is None:
        print("benchmark.sh needs mosquitto on PATH (Debian: apt-get install mosquitto)")
        return 2
    if any(run.scenario == "storm" for run in runs) and shutil.which("mosquitto_sub") is None:
        print("the storm scenario needs mosquitto_sub (Debian: apt-get install mosquitto-clients)")
        return 2
    if args.profile and shutil.which("py-spy") is None:
        print("--profile needs py-spy on PATH (pip install py-spy)")
        return 2
    skips: dict[str, str] = {}
    wants_workers = args.workers > 1 or any(run.scenario == "workers" for run in runs)
    if wants_workers and not _has_workers_flag():
        if args.workers > 1:
            print("this flux's `run` has no --workers; run without --workers")
            return 2
        skips["workers"] = "this flux's `run` has no --workers yet"
    bench = Bench(args=args)
    bench.profile_each = len(runs) > 1 or any(run.scenario == "workers" for run in runs)
    sqlite_db = Database(
        f"sqlite+aiosqlite:///{bench.workdir}/bench.db", bench.workdir / "bench.db"
    )
    results: list[dict[str, Any]] = []
    failed = False
    loadavg = os.getloadavg()
    with ExitStack() as stack:
        stack.callback(bench.close_broker)
        postgres: Database | None = None
        if any(run.postgres for run in runs):
            scratch = ScratchPostgres(args.database_url or DEFAULT_PG_URL)
            reason = scratch.probe()
            if reason and args.database_url:
                print(reason)
                return 2
            if reason:
                skips["pg"] = f"P8 needs --database-url; default: {reason}"
            else:
                stack.enter_context(scratch)
                postgres = Database(scratch.url)
                print(f"PostgreSQL scratch database {scratch.name} (dropped at the end)")
        for run in runs:
            run.workers = 1 if run.scenario == "workers" else args.workers
            head: dict[str, Any] = {
                "scenario": run.scenario,
                "ids": "/".join(run.ids),
                "database": "postgresql" if run.postgres else "sqlite",
                "workers": args.workers,
            }
            print(f"-- {run.label} {head['ids']} ...", flush=True)
            reason = skips.get(run.scenario) or (skips.get("pg", "") if run.postgres else "")
            if reason:
                rows = [{"skipped": reason}]
            else:
                bench.db = postgres if run.postgres else sqlite_db
                try:
                    rows = SCENARIOS[run.scenario](bench, run)
                except Exception as exc:  # report it, keep the work dir, run the next one
                    failed = True
                    print(f"   {run.label} failed: {exc}\n   work dir kept: {bench.workdir}")
                    rows = [{"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}]
            for row in rows:
                result = {**head, **row}
                print("   " + json.dumps(result), flush=True)
                results.append(result)
    machine = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_1m_at_start": round(loadavg[0], 2),
    }
    report = {
        "machine": machine,
        "versions": _versions(),
        "settings": {**vars(args), "database_url": _redact(args.database_url)},
        "results": results,
    }
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nmachine: {machine['cpu']}, {machine['cores']} cores, load {loadavg[0]:.2f}")
    for result in results:
        print(" | ".join(f"{key}={value}" for key, value in result.items()))
    print(f"results written to {args.output}")
    if args.plot:
        title = f"flux bench: {machine['cpu']}, {machine['cores']} cores, {time.strftime('%F %R')}"
        if plot(bench.series, args.plot, title):
            print(f"plot written to {args.plot}")
    if failed:
        return 1
    shutil.rmtree(bench.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
