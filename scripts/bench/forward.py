"""forward (F1) and catchup (F2): sinks forwarding to an upstream broker."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from scripts.bench.bench import Bench, Run
from scripts.bench.drain import drain_backlog
from scripts.bench.load import PublishCounter, publish
from scripts.bench.sampling import SAMPLE_S
from tests.harness import PrivateMosquitto, telemetry, wait_port


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
        row = drain_backlog(
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
