"""workers (P7): a QoS 0 flood against one worker, then several."""

from __future__ import annotations

import time
from typing import Any

from scripts.bench.bench import Bench, Run
from scripts.bench.load import publish
from scripts.bench.sampling import SAMPLE_S, SETTLE_S, CountSampler, Series


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
