"""Rule traces: the next evaluations of a rule, read from the batches the engine runs."""

from __future__ import annotations

import asyncio

import pytest

from flux.errors import Conflict, NotFound
from flux.rules import Rule, RuleEngine
from flux.rules.trace import MAX_TRACES

from .conftest import make_event


async def _trace_while(
    engine: RuleEngine, rule_id: str, count: int, batches: list[list[dict[str, object]]]
) -> dict[str, object]:
    """Start a trace, evaluate ``batches`` (payloads on topics s/d0, s/d1, ...), return it."""
    trace = asyncio.create_task(engine.trace(rule_id, count, timeout_s=5))
    await asyncio.sleep(0)  # the trace registers before the first batch
    for payloads in batches:
        await engine.evaluate_batch([make_event(p, f"s/d{i}") for i, p in enumerate(payloads)])
    return await trace


async def test_a_trace_shows_input_result_output_and_time(engine: RuleEngine) -> None:
    await engine.reload(
        [
            Rule(id="tr-hot", topic="s/+", when="temperature > 30"),
            Rule(
                id="tr-out",
                topic="s/+",
                script="if temperature > 30 then return {t = temperature} end",
            ),
        ]
    )
    payloads = [{"temperature": 31}, {"temperature": 20}, {"temperature": 40}]
    trace = await _trace_while(engine, "tr-out", 3, [payloads])
    assert trace["complete"] is True and trace["rule_id"] == "tr-out"
    records = trace["evaluations"]
    assert isinstance(records, list)
    assert [r["result"] for r in records] == ["matched", "not_matched", "matched"]
    assert [r["output"] for r in records] == [{"t": 31}, None, {"t": 40}]
    assert [r["input"]["payload"] for r in records] == payloads
    assert [r["input"]["topic"] for r in records] == ["s/d0", "s/d1", "s/d2"]
    assert all(r["time_us"] > 0 and r["error"] is None for r in records)


async def test_a_trace_shows_errors_with_their_line(engine: RuleEngine) -> None:
    script = "local x = 1\nif fail then error('broken on purpose') end\nreturn true"
    await engine.reload([Rule(id="tr-err", topic="s/+", script=script)])
    trace = await _trace_while(engine, "tr-err", 2, [[{"fail": True}, {}]])
    first, second = trace["evaluations"]  # type: ignore[misc]
    assert first["result"] == "error" and first["output"] is None
    assert first["error"]["kind"] == "runtime" and first["error"]["line"] == 2
    assert "broken on purpose" in first["error"]["message"]
    assert second["result"] == "matched"


async def test_a_trace_spans_batches_and_skips_events_the_rule_does_not_see(
    engine: RuleEngine,
) -> None:
    await engine.reload(
        [
            Rule(id="tr-d1", topic="s/d1", when="true"),
            Rule(id="tr-all", topic="s/+", when="true"),
        ]
    )
    trace = await _trace_while(engine, "tr-d1", 3, [[{"n": i}, {"n": i}] for i in range(4)])
    records = trace["evaluations"]
    assert isinstance(records, list) and len(records) == 3
    assert [r["input"]["payload"]["n"] for r in records] == [0, 1, 2]
    assert {r["input"]["topic"] for r in records} == {"s/d1"}


async def test_a_traced_rule_with_state_runs_once_per_event(engine: RuleEngine) -> None:
    """The trace reads the batch's outcome: ``state`` advances once per event, not twice."""
    script = "state.n = (state.n or 0) + 1\nreturn {n = state.n}"
    await engine.reload([Rule(id="tr-state", topic="s/+", script=script)])
    trace = await _trace_while(engine, "tr-state", 3, [[{}], [{}], [{}]])
    assert [r["output"] for r in trace["evaluations"]] == [{"n": 1}, {"n": 2}, {"n": 3}]  # type: ignore[union-attr]


async def test_a_trace_that_times_out_returns_what_it_saw(engine: RuleEngine) -> None:
    await engine.reload([Rule(id="tr-slow", topic="s/+", when="true")])
    trace = asyncio.create_task(engine.trace("tr-slow", 5, timeout_s=0.3))
    await asyncio.sleep(0)
    await engine.evaluate_batch([make_event({}, "s/d0"), make_event({}, "s/d1")])
    result = await trace
    assert result["complete"] is False
    assert len(result["evaluations"]) == 2


async def test_traces_run_side_by_side_and_are_bounded(engine: RuleEngine) -> None:
    await engine.reload(
        [Rule(id="tr-a", topic="s/+", when="true"), Rule(id="tr-b", topic="s/+", when="false")]
    )
    with pytest.raises(NotFound):
        await engine.trace("tr-none", 1, timeout_s=1)
    traces = [
        asyncio.create_task(engine.trace("tr-a", 1, timeout_s=5)) for _ in range(MAX_TRACES - 1)
    ]
    other = asyncio.create_task(engine.trace("tr-b", 2, timeout_s=5))
    await asyncio.sleep(0)
    with pytest.raises(Conflict):
        await engine.trace("tr-a", 1, timeout_s=1)
    await engine.evaluate_batch([make_event({}, "s/d0"), make_event({}, "s/d1")])
    done = await asyncio.gather(*traces, other)
    assert all(t["complete"] for t in done)
    assert [r["result"] for r in done[-1]["evaluations"]] == ["not_matched", "not_matched"]
    # Closed traces free their places, and cost nothing any more.
    assert not engine.tracing
