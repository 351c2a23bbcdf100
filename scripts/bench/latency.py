"""latency (P2): a paced QoS 1 stream, publish -> visible in the database per message."""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from scripts.bench.bench import Bench, Run
from scripts.bench.sampling import SAMPLE_S, Series, percentile


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
        "p50_ms": round(percentile(latencies, 50), 2),
        "p95_ms": round(percentile(latencies, 95), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies, default=float("nan")), 2),
    }
    if db.kind == "postgresql":
        result["late_found"] = late
    return [{**result, **stats, **metrics}]
