"""The ``retention`` bench scenario: publish -> commit latency while a big purge runs.

The SQLite database is seeded with ``PURGE_ROWS`` events 60 days old, then the same paced
QoS 1 stream as ``latency`` (``--rate`` messages/s for ``--duration`` s, the bench's rules
and plugin) is measured twice against it: first with retention off (``without``), then
with ``retention_days = 30``, so the gateway purges the seeded rows from its start while
the stream runs (``with``). Each row reports p50/p95/p99/max of publish -> visible in the
database over the whole stream; the second one also when the seeded rows were all deleted
and when the file had given their pages back (``purge_rows_gone_s``, ``purge_reclaimed_s``,
from the stream's start), the same percentiles over the messages sent until then
(``during_purge``) and ``p99_during_purge_vs_without``. ``purge_within_stream`` says
whether the stream outlasted the purge (else all of it ran under the purge). Issue 12's
target: at 2,000 messages/s, p99 at most 2x without (``--rate 2000 --duration 30``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

if TYPE_CHECKING:
    from bench import Bench, Run

#: Old events the purge has to delete.
PURGE_ROWS = 1_000_000
SEED_DAYS_AGO = 60
#: How long to wait, after the stream, for the purge to finish (it is reported either way).
PURGE_WAIT_S = 300
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
            PurgeWatch(db.sqlite_path, newest_seeded) as purge,
        ):
            samples = _paced_stream(bench, broker.port, db.sqlite_path, origin=purge.started)
            row = {"messages": len(samples), **_latency(samples)}
            if label == "with":
                row.update(purge.report(stream_s=samples[-1][0]))
                ended = row["purge_reclaimed_s"] or samples[-1][0]
                row["during_purge"] = _latency([s for s in samples if s[0] <= ended])
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


class PurgeWatch:
    """Note, from a connection of its own, when the seeded rows are all gone (the purge
    deletes them oldest first, so the newest goes last) and when the file has given their
    pages back (free pages down to what retention keeps for new rows)."""

    def __init__(self, path: Path, newest_seeded: str) -> None:
        self._conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
        self._newest = newest_seeded
        self.started = time.perf_counter()
        self.rows_gone_at: float | None = None
        self.reclaimed_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PurgeWatch:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._conn.close()

    def _run(self) -> None:
        from flux.store.retention import KEEP_FREE

        while not self._stop.wait(0.1):
            now = time.perf_counter() - self.started
            if self.rows_gone_at is None:
                found = "SELECT 1 FROM events WHERE id = ?"
                if not self._conn.execute(found, (self._newest,)).fetchall():
                    self.rows_gone_at = now
            else:
                free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
                pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
                if free <= pages * KEEP_FREE:
                    self.reclaimed_at = now
                    return

    def report(self, stream_s: float) -> dict[str, Any]:
        """When the purge deleted the rows and reclaimed their space, counted from the
        gateway's start, waiting up to ``PURGE_WAIT_S`` after the stream for them."""
        deadline = time.monotonic() + PURGE_WAIT_S
        while self.reclaimed_at is None and time.monotonic() < deadline:
            time.sleep(0.1)
        done = self.reclaimed_at
        return {
            "purge_rows_gone_s": None if self.rows_gone_at is None else round(self.rows_gone_at, 1),
            "purge_reclaimed_s": None if done is None else round(done, 1),
            "purge_within_stream": done is not None and done <= stream_s,
        }


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
