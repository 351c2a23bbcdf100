"""Evaluation cost per event for 10 and 100 rules, batched (pytest-benchmark, one round in CI).

No timing is asserted: the numbers are for reading (``pytest tests/rules/test_bench_rules.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flux.rules import Rule, RuleEngine

from .conftest import make_event

BATCH = 256


def rules(count: int) -> list[Rule]:
    out = []
    for k in range(count):
        if k % 10 == 9:
            script = (
                "local p = state.t\nstate.t = temperature\n"
                f"if p and temperature - p > {k % 4 + 3} then return {{d = temperature - p}} end"
            )
            out.append(Rule(id=f"r{k}", topic="devices/+/telemetry", script=script))
        else:
            out.append(
                Rule(
                    id=f"r{k}",
                    topic="devices/+/telemetry",
                    when=f"temperature > {90 + k % 7} and humidity < {60 - k % 5}",
                )
            )
    return out


def window_rules(count: int) -> list[Rule]:
    """``count`` 60 s tumbling windows per device (the shipped example's shape)."""
    return [
        Rule(
            id=f"w{k}",
            topic="devices/+/telemetry",
            window={"type": "tumbling", "size_s": 60},
            select={"avg_t": "avg(temperature)", "max_h": "max(humidity)", "n": "count()"},
            when=f"avg_t > {90 + k % 7} and n >= 3",
        )
        for k in range(count)
    ]


def events(devices: int = 50) -> list[Any]:
    return [
        make_event(
            {"temperature": 20.5 + i % 20, "humidity": 40 + i % 30, "battery": 80, "status": "ok"},
            f"devices/d{i % devices}/telemetry",
            received_at=1_700_000_000.0 + i,
        )
        for i in range(BATCH)
    ]


@pytest.mark.parametrize("count", [10, 100])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "per-rule"])
def test_bench_evaluate_batch(benchmark: Any, count: int, fuse: bool) -> None:
    loop = asyncio.new_event_loop()
    try:
        engine = RuleEngine(fuse=fuse)
        loop.run_until_complete(engine.__aenter__())
        loop.run_until_complete(engine.reload(rules(count)))
        batch = events()
        loop.run_until_complete(engine.evaluate_batch(batch))
        result = benchmark.pedantic(
            lambda: loop.run_until_complete(engine.evaluate_batch(batch)), rounds=20, iterations=1
        )
        assert isinstance(result, list)
        benchmark.extra_info["events_per_batch"] = BATCH
        benchmark.extra_info["rules"] = count
        loop.run_until_complete(engine.__aexit__(None, None, None))
    finally:
        loop.close()


@pytest.mark.parametrize("kind", ["stateless", "window"])
def test_bench_window_rules(benchmark: Any, kind: str) -> None:
    """10 stateless rules against 10 window rules, 100 devices (issue 14's cost target)."""
    loop = asyncio.new_event_loop()
    try:
        engine = RuleEngine()
        loop.run_until_complete(engine.__aenter__())
        chosen = rules(10) if kind == "stateless" else window_rules(10)
        loop.run_until_complete(engine.reload(chosen))
        batch = events(devices=100)
        loop.run_until_complete(engine.evaluate_batch(batch))
        result = benchmark.pedantic(
            lambda: loop.run_until_complete(engine.evaluate_batch(batch)), rounds=50, iterations=1
        )
        assert isinstance(result, list)
        benchmark.extra_info["events_per_batch"] = BATCH
        loop.run_until_complete(engine.__aexit__(None, None, None))
    finally:
        loop.close()


def test_bench_compile(benchmark: Any) -> None:
    loop = asyncio.new_event_loop()
    try:
        engine = RuleEngine()
        loop.run_until_complete(engine.__aenter__())
        counter = iter(range(1, 1_000_000))

        def reload() -> Any:
            version = next(counter)
            changed = [r.model_copy(update={"version": version}) for r in rules(100)]
            return loop.run_until_complete(engine.reload(changed))

        report = benchmark.pedantic(reload, rounds=3, iterations=1)
        assert report.compiled == 100
        loop.run_until_complete(engine.__aexit__(None, None, None))
    finally:
        loop.close()
