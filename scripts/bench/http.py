"""http (P4): single and batch event POSTs from many keep-alive connections."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from scripts.bench.bench import Bench, Run
from scripts.bench.sampling import CountSampler, Series, percentile


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
            "p50_ms": round(percentile(latencies, 50), 2),
            "p95_ms": round(percentile(latencies, 95), 2),
            "p99_ms": round(percentile(latencies, 99), 2),
            "batch_events_per_s": round(batch_rate),
            "batch_p95_ms": round(percentile(batch_latencies, 95), 2),
            **stats,
            **metrics,
        }
    ]
