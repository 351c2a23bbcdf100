"""Hostile rules: each is stopped within its budget while the other rules keep producing results."""

from __future__ import annotations

from pathlib import Path

import pytest

from flux.rules import Rule, RuleEngine
from flux.rules.sandbox import LuaSandbox

from .conftest import make_event

HOSTILE = {
    "busy-loop": ("while true do end", "timeout"),
    "loop-in-pcall": ("pcall(function() while true do end end)", "runtime"),
    "loop-in-coroutine": (
        "local co = coroutine.create(function() while true do end end)\ncoroutine.resume(co)",
        "runtime",
    ),
    "rep-huge": ('return string.rep("x", 2^30)', "timeout"),
    "rep-method": ('return ("x"):rep(2^30)', "timeout"),
    "catastrophic-find": (
        'local s = string.rep("a", 5000)\nreturn string.find(s, string.rep("a*", 20) .. "b")',
        "timeout",
    ),
    "find-on-payload": ('return msg.long:find("a*a*a*b")', "timeout"),
    "os-execute": ('os.execute("touch /tmp/flux-pwned")', "runtime"),
    "io-open": ('return io.open("/etc/passwd")', "runtime"),
    "require": ('return require("os")', "runtime"),
    "load-dump": ("return load(string.dump(function() end))", "runtime"),
    "python-eval": ('return python.eval("1+1")', "runtime"),
    "string-metatable": ('return getmetatable("").__index', "runtime"),
    "attrgetter": ("return python.as_attrgetter(msg).__class__", "runtime"),
    "memory-doubling": (
        'local s = "xxxxxxxx"\nfor i = 1, 40 do s = s .. s end\nreturn #s',
        "memory",
    ),
    "debug-hook": ("debug.sethook()", "runtime"),
    "collectgarbage": ('collectgarbage("stop")', "runtime"),
    "setmetatable": ("setmetatable(msg, nil)", "runtime"),
    "rawset": ('rawset(_ENV, "x", 1)', "runtime"),
    "global-write": ("x = 1", "runtime"),
    "library-write": ("string.find = nil", "runtime"),
    "payload-write": ("msg.temperature = -100", "runtime"),
    "table-sort-huge": (
        "local t = {}\nfor i = 1, 150000 do t[i] = -i end\ntable.sort(t)",
        "timeout",
    ),
}


@pytest.fixture
async def hostile_engine() -> RuleEngine:
    async with RuleEngine(
        quarantine_after=100, instruction_budget=1_000_000, memory_limit=32 * 1024 * 1024
    ) as running:
        rules = [
            Rule(id=rule_id, topic="devices/+/telemetry", script=script)
            for rule_id, (script, _kind) in HOSTILE.items()
        ]
        # Good rules before, between and after the hostile ones (fused groups and fallback).
        rules.insert(0, Rule(id="good-first", topic="devices/+/telemetry", when="temperature > 30"))
        rules.insert(
            8, Rule(id="good-middle", topic="devices/#", script="return {t = temperature}")
        )
        rules.append(Rule(id="good-last", topic="devices/+/telemetry", when="temperature > 30"))
        report = await running.reload(rules)
        assert report.result == "ok", report.to_dict()
        yield running  # type: ignore[misc]


async def test_hostile_rules_are_stopped_and_others_still_run(hostile_engine: RuleEngine) -> None:
    events = [
        make_event({"temperature": 31, "long": "a" * 20_000}),
        make_event({"temperature": 29, "long": "short"}),
        make_event({"temperature": 35, "long": "a" * 20_000}),
    ]
    matches = await hostile_engine.evaluate_batch(events)
    good = [(m.rule.id, m.event.payload["temperature"]) for m in matches if "good" in m.rule.id]
    assert good == [
        ("good-first", 31),
        ("good-middle", 31),
        ("good-last", 31),
        ("good-middle", 29),
        ("good-first", 35),
        ("good-middle", 35),
        ("good-last", 35),
    ]
    assert [m.output for m in matches if m.rule.id == "good-middle"] == [
        {"t": 31},
        {"t": 29},
        {"t": 35},
    ]
    statuses = {s.id: s for s in hostile_engine.rules()}
    for rule_id, (_script, kind) in HOSTILE.items():
        status = statuses[rule_id]
        assert status.last_error is not None, rule_id
        assert status.last_error["kind"] == kind, (rule_id, status.last_error)
        assert status.failures >= 1
    assert not Path("/tmp/flux-pwned").exists()  # noqa: ASYNC240


async def test_hostile_error_messages_name_the_missing_thing(hostile_engine: RuleEngine) -> None:
    await hostile_engine.evaluate_batch([make_event({"temperature": 1, "long": "x"})])
    status = {s.id: s.last_error for s in hostile_engine.rules()}
    assert "pcall" in status["loop-in-pcall"]["message"]  # type: ignore[index]
    assert "execute" in status["os-execute"]["message"]  # type: ignore[index]
    assert "read-only" in status["library-write"]["message"]  # type: ignore[index]
    assert "read-only" in status["payload-write"]["message"]  # type: ignore[index]
    assert "cannot assign global 'x'" in status["global-write"]["message"]  # type: ignore[index]
    assert status["busy-loop"]["line"] == 1  # type: ignore[index]


async def test_rule_cannot_clobber_shared_environment(engine: RuleEngine) -> None:
    rules = [
        Rule(id="clobber", topic="a", when="(function() _ENV = nil end)() or true"),
        Rule(id="clobber-script", topic="a", script="_ENV = {}\nreturn true"),
        Rule(id="after", topic="a", when="temperature > 30 and math.floor(1.5) == 1"),
    ]
    await engine.reload(rules)
    for _ in range(2):
        matches = await engine.evaluate_batch([make_event({"temperature": 40}, "a")])
        assert [m.rule.id for m in matches] == ["clobber", "clobber-script", "after"]


async def test_state_is_bounded_and_scalar(engine: RuleEngine) -> None:
    rules = [
        Rule(id="many-keys", topic="a", script='for i = 1, 100 do state["k" .. i] = i end'),
        Rule(id="table-value", topic="a", script="state.x = {}"),
        Rule(id="counter", topic="a", script="state.n = (state.n or 0) + 1\nreturn {n = state.n}"),
    ]
    await engine.reload(rules)
    matches = await engine.evaluate_batch([make_event({}, "a"), make_event({}, "a")])
    assert [m.output for m in matches] == [{"n": 1}, {"n": 2}]
    errors = {s.id: s.last_error for s in engine.rules() if s.last_error}
    assert "32 keys" in errors["many-keys"]["message"]
    assert "numbers, strings or booleans" in errors["table-value"]["message"]


async def test_state_evicts_the_oldest_device() -> None:
    async with RuleEngine(max_state_devices=3) as engine:
        await engine.reload([Rule(id="s", topic="devices/+/x", script="state.seen = true")])
        events = [make_event({}, f"devices/d{i}/x") for i in range(10)]
        await engine.evaluate_batch(events)
        assert engine.sandbox.state_devices("s") == 3


async def test_missing_fields_compare_false_and_index_to_nil(engine: RuleEngine) -> None:
    rules = [
        Rule(id="cmp", topic="a", when="temperature > 30"),
        Rule(id="not-cmp", topic="a", when="not (temperature > 30)"),
        Rule(id="nested", topic="a", when="location.lat == nil"),
        Rule(id="arith", topic="a", when="temperature * 2 > 10"),
    ]
    await engine.reload(rules)
    matches = await engine.evaluate_batch([make_event({}, "a")])
    assert [m.rule.id for m in matches] == ["not-cmp", "nested"]
    # Arithmetic on a missing field is "undefined" for a when-condition: no match, no failure.
    assert {s.id: s.failures for s in engine.rules()}["arith"] == 0


def test_bytecode_is_refused() -> None:
    sandbox = LuaSandbox()
    fn, err = sandbox.compile("\x1bLua", "=bytecode")
    assert fn is None
    assert err is not None and "binary" in err
