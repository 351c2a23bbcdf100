"""The ``retention`` bench scenario: publish -> commit latency while a big purge runs.

The SQLite database is seeded with ``PURGE_ROWS`` events 60 days old, then the same paced
QoS 1 stream as ``latency`` (``--rate`` messages/s for ``--duration`` s, the bench's rules
and plugin) is measured twice against it: first with retention off (``without``), then
with ``retention_days = 30``, so the gateway purges the seeded rows from its start while
the stream runs (``with``). Each row reports p50/p95/p99/max of publish -> visible in the
database over the whole stream; the second one also when the seeded rows were all deleted
and when the file had given their pages back (``purge_rows_gone_s``, ``purge_reclaimed_s``,
from the stream's start), the same percentiles over the messages sent until then
(``during_purge``) and ``p99_during_purge_vs_without``; when the stream outlasts the purge
(``purge_within_stream``) also over the messages sent after it (``after_purge``: the same
gateway, minutes closer than the first run, so less exposed to a shared machine's drift)
and ``p99_during_vs_after_purge``. Issue 12's target: at 2,000 messages/s, p99 at most 2x
without (``--rate 2000 --duration 60``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

if TYPE_CHECKING:
    from scripts.bench.bench import Bench, Run

#: Old events the purge has to delete.
PURGE_ROWS = 1_000_000
SEED_DAYS_AGO = 60
#: How long to wait, after the stream, for the purge to finish (it is reported either way).
PURGE_WAIT_S = 300
#: Messages sent after the purge that make a comparison within the same run.
MIN_AFTER_SAMPLES = 5_000
_TOPIC = "devices/latency/telemetry"


def scenario_retention(bench: Bench, run: Run) -> list[dict[str, Any]]:
    """Measure the paced stream's latency without, then with, a purge of ``PURGE_ROWS``."""
    db = bench.db
    assert db is not None
    if db.sqlite_path is None:
        return [{"skipped": "the retention scenario measures SQLite (one writer lock)"}]
    rows = []
    for label, database in (
        ("without", {"retention_days": 0}),
        ("with", {"retention_days": 30, "retention_interval_s": 3600}),
    ):
        broker = bench.new_broker()
        db.reset()
        config = bench.config(run.workers, database=database)
        newest_seeded = _seed(config, db.sqlite_path)
        with (
            bench.gateway(config, workers=run.workers, profile_as=f"{run.label}-{label}") as gw,
            watch_purge(db.sqlite_path, newest_seeded) as purge,
        ):
            samples = _paced_stream(bench, broker.port, db.sqlite_path, origin=purge.origin)
            row = {"messages": len(samples), **_latency(samples)}
            if label == "with":
                row.update(purge.report(stream_s=samples[-1][0]))
                ended = row["purge_reclaimed_s"] or samples[-1][0]
                row["during_purge"] = _latency([s for s in samples if s[0] <= ended])
                after = [s for s in samples if s[0] > ended]
                if len(after) >= MIN_AFTER_SAMPLES:
                    row["after_purge"] = _latency(after)
                    row["p99_during_vs_after_purge"] = round(
                        row["during_purge"]["p99_ms"] / row["after_purge"]["p99_ms"], 2
                    )
            row.update(gw.stats())
            row.update(gw.metrics())
        rows.append({"purge": label, "seeded_rows": PURGE_ROWS, "rate": bench.args.rate, **row})
    without, with_purge = rows
    during = with_purge["during_purge"]["p99_ms"]
    with_purge["p99_during_purge_vs_without"] = round(during / without["p99_ms"], 2)
    return rows


def _seed(config: Path, path: Path) -> str:
    """Migrate the database, then write ``PURGE_ROWS`` old events; return the newest id."""
    from flux.config import load_settings
    from flux.store.migrate import upgrade
    from flux.store.sqlite_batch import SqliteTime

    upgrade(load_settings(config, environ={}).database)
    base = time.time() - SEED_DAYS_AGO * 86_400
    stamp = SqliteTime()
    payload = '{"seq": -1, "temperature": 21.5, "humidity": 40, "battery": 3.7, "seeded": true}'

    def row(i: int) -> tuple[str, str, str, str, str]:
        at = base + i / 1000
        device = f"seed-{i % 200}"
        event_id = f"{int(at * 1000):012x}5eed5eed{i:012x}"
        return (event_id, device, f"devices/{device}/telemetry", payload, stamp(at))

    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, 'mqtt', 0)",
            (row(i) for i in range(PURGE_ROWS)),
        )
    return row(PURGE_ROWS - 1)[0]


@dataclass
class PurgeTimes:
    """When the seeded rows were all gone and when their space was given back, in seconds
    from the stream's start (``origin``); None until then."""

    origin: float = field(default_factory=time.perf_counter)
    rows_gone_s: float | None = None
    reclaimed_s: float | None = None

    def report(self, stream_s: float) -> dict[str, Any]:
        """The times, waiting up to ``PURGE_WAIT_S`` after the stream for them."""
        deadline = time.monotonic() + PURGE_WAIT_S
        while self.reclaimed_s is None and time.monotonic() < deadline:
            time.sleep(0.1)
        gone, done = self.rows_gone_s, self.reclaimed_s
        return {
            "purge_rows_gone_s": None if gone is None else round(gone, 1),
            "purge_reclaimed_s": None if done is None else round(done, 1),
            "purge_within_stream": done is not None and done <= stream_s,
        }


@contextmanager
def watch_purge(path: Path, newest_seeded: str) -> Iterator[PurgeTimes]:
    """Note, from a connection of its own on a thread, when the seeded rows are all gone
    (the purge deletes them oldest first, so the newest goes last) and when the file has
    given their pages back (free pages down to what retention keeps for new rows)."""
    from flux.store.retention import KEEP_FREE

    times = PurgeTimes()
    stop = threading.Event()

    def watch() -> None:
        with closing(sqlite3.connect(path, timeout=30)) as conn:
            while not stop.wait(0.1):
                now = time.perf_counter() - times.origin
                if times.rows_gone_s is None:
                    found = "SELECT 1 FROM events WHERE id = ?"
                    if not conn.execute(found, (newest_seeded,)).fetchall():
                        times.rows_gone_s = now
                    continue
                free, pages = (
                    conn.execute(f"PRAGMA {name}").fetchone()[0]
                    for name in ("freelist_count", "page_count")
                )
                if free <= pages * KEEP_FREE:
                    times.reclaimed_s = now
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield times
    finally:
        stop.set()
        watcher.join(30)


#: A message of the paced stream: when it was sent (s after ``origin``), its latency (ms),
#: or None when it never became visible.
Sample = tuple[float, float | None]


def _paced_stream(bench: Bench, port: int, path: Path, *, origin: float) -> list[Sample]:
    """Publish ``--rate`` QoS 1 messages/s for ``--duration`` s; time each one from publish
    to its row being visible (a reader polls every 2 ms for rows after the seeded ones)."""
    args = bench.args
    total = int(args.rate * args.duration)
    sent: list[float] = []
    seen: dict[int, float] = {}
    stop = threading.Event()
    errors: list[Exception] = []
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
    last_rowid = int(conn.execute("SELECT coalesce(max(rowid), 0) FROM events").fetchone()[0])

    def watch() -> None:
        nonlocal last_rowid
        try:
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT rowid, payload FROM events WHERE rowid > ? AND topic = ?",
                    (last_rowid, _TOPIC),
                ).fetchall()
                now = time.perf_counter()
                for rowid, payload in rows:
                    last_rowid = max(last_rowid, rowid)
                    seen.setdefault(orjson.loads(payload)["seq"], now)
                time.sleep(0.002)
        except Exception as exc:
            errors.append(exc)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-retention")
    client.max_inflight_messages_set(10_000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.perf_counter()
    for seq in range(total):
        delay = started + seq / args.rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent.append(time.perf_counter())
        client.publish(_TOPIC, orjson.dumps({"seq": seq, "temperature": 21.5}), qos=1)
    deadline = time.monotonic() + 30
    while len(seen) < total and not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    watcher.join(30)
    client.disconnect()
    client.loop_stop()
    conn.close()
    if errors:
        raise RuntimeError(f"latency watcher failed: {errors[0]!r}") from errors[0]
    return [
        (at - origin, (seen[seq] - at) * 1000 if seq in seen else None)
        for seq, at in enumerate(sent)
    ]


def _latency(samples: list[Sample]) -> dict[str, Any]:
    """Percentiles of the latencies of ``samples`` (ms), and how many never arrived."""
    latencies = sorted(ms for _, ms in samples if ms is not None)

    def percentile(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * q / 100))], 2)

    return {
        "p50_ms": percentile(50),
        "p95_ms": percentile(95),
        "p99_ms": percentile(99),
        "max_ms": round(latencies[-1], 2),
        "missing": len(samples) - len(latencies),
    }
