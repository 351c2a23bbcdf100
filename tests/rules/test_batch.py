"""Batches in Lua: what rules see, and the results decoded into matches and failures."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from flux.events import Event
from flux.rules import ActionExecutor, Rule, RuleEngine
from flux.rules.batch import BatchOutcome, evaluate, to_python
from flux.rules.compiler import compile_rule
from flux.rules.ruleset import GROUP_SIZE, Ruleset
from flux.rules.sandbox import LuaSandbox

from .conftest import make_event


def run(
    rules: Sequence[Rule],
    events: Sequence[Event],
    *,
    version: int = 1,
    quarantine_after: int = 5,
    fuse: bool = True,
) -> tuple[Ruleset, BatchOutcome]:
    """Evaluate ``events`` against ``rules`` in a fresh sandbox, without an engine."""
    sandbox = LuaSandbox()
    ruleset = Ruleset(
        sandbox=sandbox,
        version=version,
        compiled=[compile_rule(sandbox, rule) for rule in rules],
        quarantine_after=quarantine_after,
        fuse=fuse,
    )
    return ruleset, evaluate(ruleset, events)


async def test_runtime_error_lines_map_into_fused_expressions(engine: RuleEngine) -> None:
    when = "temperature > 1\nand\nerror('bad ' .. temperature)"
    rules = [
        Rule(id="first", topic="a", when="true"),
        Rule(id="multi", topic="a", when=when),
        Rule(id="script", topic="a", script="local x = 1\n\nerror('boom')"),
    ]
    await engine.reload(rules)
    matches = await engine.evaluate_batch([make_event({"temperature": 5}, "a")])
    assert [m.rule.id for m in matches] == ["first"]
    errors = {s.id: s.last_error for s in engine.rules() if s.last_error}
    assert errors["script"]["line"] == 3
    assert errors["script"]["message"] == "boom"
    assert errors["multi"]["kind"] == "runtime"
    assert errors["multi"]["message"] == "bad 5"
    assert errors["multi"]["line"] == 3


async def test_many_rules_span_several_fused_groups(engine: RuleEngine) -> None:
    count = GROUP_SIZE * 2 + 7
    rules = [Rule(id=f"r{k}", topic="devices/+/t", when=f"v == {k % 5}") for k in range(count)]
    rules[GROUP_SIZE + 1] = Rule(id="boom", topic="devices/+/t", script="error('x')")
    await engine.reload(rules)
    events = [make_event({"v": v}, f"devices/d{v}/t") for v in range(5)]
    matches = await engine.evaluate_batch(events)
    got = [(m.event.payload["v"], m.rule.id) for m in matches]
    expected = [
        (v, rule.id)
        for v in range(5)
        for k, rule in enumerate(rules)
        if rule.id != "boom" and k % 5 == v
    ]
    assert got == expected


async def test_globals_available_to_rules(engine: RuleEngine) -> None:
    script = (
        "return {topic = topic, device = device_id, at = received_at, t = msg.temperature,"
        " n = #msg.list, first = msg.list[1], keys = (function() local c = 0"
        " for _ in pairs(msg) do c = c + 1 end return c end)()}"
    )
    await engine.reload([Rule(id="g", topic="devices/+/t", script=script)])
    [match] = await engine.evaluate_batch(
        [make_event({"temperature": 3.5, "list": [4, 5]}, "devices/d9/t", received_at=12.5)]
    )
    assert match.output == {
        "topic": "devices/d9/t",
        "device": "d9",
        "at": 12.5,
        "t": 3.5,
        "n": 2,
        "first": 4,
        "keys": 2,
    }


async def test_generic_path_matches_fused_path() -> None:
    rules = [
        Rule(id="a", topic="t", when="x > 1"),
        Rule(id="b", topic="t", script="if x > 2 then return {x = x} end"),
    ]
    events = [make_event({"x": v}, "t") for v in range(5)]
    results = []
    for fuse in (True, False):
        async with RuleEngine(fuse=fuse) as engine:
            await engine.reload(rules)
            results.append(
                [
                    (m.rule.id, m.event.payload["x"], m.output)
                    for m in await engine.evaluate_batch(events)
                ]
            )
    assert results[0] == results[1]


async def test_derived_events_sharing_objects_are_converted_intact(engine: RuleEngine) -> None:
    # lupa's recursive table_from empties repeated references to one dict; the engine
    # converts each payload once and derived payloads through a JSON round trip.
    shared = {"lat": 1.0}
    executor = ActionExecutor()
    derived = executor.derive(make_event({}), topic="a", payload={"x": shared, "y": shared})
    assert derived is not None
    same = {"v": 5}
    await engine.reload(
        [
            Rule(
                id="r",
                topic="a",
                script="return {x = msg.x and msg.x.lat, y = msg.y and msg.y.lat, v = v}",
            )
        ]
    )
    matches = await engine.evaluate_batch([derived, make_event(same, "a"), make_event(same, "a")])
    assert [m.output for m in matches] == [{"x": 1.0, "y": 1.0}, {"v": 5}, {"v": 5}]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "per-rule"])
def test_outcome_counts_per_rule_index_in_event_then_rule_order(fuse: bool) -> None:
    rules = [
        Rule(id="hot", topic="devices/+/t", when="temperature > 30"),
        Rule(id="any", topic="devices/#", when="true"),
        Rule(id="other", topic="elsewhere", when="true"),
    ]
    events = [
        make_event({"temperature": 31}, "devices/d1/t"),
        make_event({"temperature": 20}, "devices/d2/t"),
        make_event({}, "unrelated"),
        make_event({"temperature": 35}, "devices/d3/t"),
    ]
    ruleset, outcome = run(rules, events, version=7, fuse=fuse)
    assert [(m.rule.id, m.event.device_id) for m in outcome.matches] == [
        ("hot", "d1"),
        ("any", "d1"),
        ("any", "d2"),
        ("hot", "d3"),
        ("any", "d3"),
    ]
    assert {m.ruleset_version for m in outcome.matches} == {7}
    assert outcome.evaluations == {1: 3, 2: 3}
    assert outcome.matched == {1: 2, 2: 3}
    assert outcome.failures == [] and outcome.undefined == {} and outcome.quarantined == []
    assert outcome.elapsed > 0
    assert ruleset.quarantined == set()


def test_no_applicable_event_means_no_call_into_lua() -> None:
    _ruleset, outcome = run([Rule(id="r", topic="a", when="true")], [make_event({}, "b")])
    assert outcome == BatchOutcome()


def test_script_outputs_are_decoded_and_a_bad_one_is_a_failure() -> None:
    rules = [
        Rule(id="list", topic="a", script="return {3, 1, 2}"),
        Rule(id="function", topic="a", script="return {f = function() end}"),
        Rule(id="deep", topic="a", script="local t = {}\nfor i = 1, 40 do t = {t} end\nreturn t"),
        Rule(id="plain", topic="a", script="return {ok = true, n = 0.5}"),
    ]
    event = make_event({}, "a")
    _ruleset, outcome = run(rules, [event])
    assert [(m.rule.id, m.output) for m in outcome.matches] == [
        ("list", {"values": [3, 1, 2]}),
        ("plain", {"ok": True, "n": 0.5}),
    ]
    failures = {rule_index: failure for rule_index, failure in outcome.failures}
    assert set(failures) == {2, 3}
    assert failures[2].rule_id == "function"
    assert failures[2].kind == "runtime"
    assert failures[2].message.startswith("bad output: output contains a ")
    assert failures[2].event_id == event.id
    assert failures[2].line is None
    assert failures[3].message == "bad output: output is nested deeper than 32 tables"
    assert outcome.matched == {1: 1, 4: 1}


def test_failures_carry_kind_line_and_event_and_quarantine_in_lua() -> None:
    rules = [
        Rule(id="spin", topic="a", script="local n = 0\nwhile true do n = n + 1 end"),
        Rule(id="undefined", topic="a", when="temperature * 2 > 10"),
        Rule(id="ok", topic="a", when="true"),
    ]
    events = [make_event({}, "a"), make_event({}, "a"), make_event({}, "a")]
    ruleset, outcome = run(rules, events, quarantine_after=2)
    failures = [(rule_index, f.kind, f.line, f.event_id) for rule_index, f in outcome.failures]
    assert failures == [(1, "timeout", 2, events[0].id), (1, "timeout", 2, events[1].id)]
    assert outcome.failures[0][1].to_error().kind == "timeout"
    # A when-condition over a missing field is "undefined": counted, neither failure nor match.
    assert outcome.undefined == {2: 3}
    assert outcome.quarantined == [1]
    assert ruleset.quarantined == {1}
    assert ruleset.consecutive_failures(1) == 2
    assert [m.rule.id for m in outcome.matches] == ["ok"] * 3
    assert ruleset.plan("a")[1] == (2, 3)


def test_to_python_makes_json_ready_values() -> None:
    sandbox = LuaSandbox()
    table = sandbox.runtime.eval("{1, 2, {a = 0/0, b = 1/0, c = 'x', [4] = true}, {}}")
    assert to_python(table) == [1, 2, {"a": None, "b": None, "c": "x", "4": True}, {}]
    assert to_python(b"caf\xc3\xa9 \xff") == "café \ufffd"
    assert to_python(math.pi) == math.pi
    many = sandbox.runtime.eval(
        "(function() local t = {} for i = 1, 10001 do t[i] = i end return t end)()"
    )
    with pytest.raises(ValueError, match="more than 10000 values"):
        to_python(many)
