"""drain (P1, P3, P5, P8): a QoS 1 backlog queued while the gateway is stopped, then drained."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.bench.bench import Bench, Run
from scripts.bench.load import PublishCounter, publish
from scripts.bench.sampling import SAMPLE_S, CountSampler, Series


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
        drain_backlog(
            bench,
            run,
            config,
            total,
            lambda: publish(broker.port, args.messages, args.publishers, args.qos)[0],
        )
    ]


def drain_backlog(
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
