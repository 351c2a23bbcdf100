"""The engine: compile errors, fused evaluation, quarantine, reload atomicity and coalescing."""

from __future__ import annotations

import asyncio
import gc

import pytest
from prometheus_client import REGISTRY

from flux.rules import (
    Rule,
    RuleCompileError,
    RuleEngine,
    RuleTimeout,
    RuleValidationError,
)
from flux.rules.ruleset import GROUP_SIZE
from flux.rules.sandbox import LuaSandbox

from .conftest import make_event


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_compile_errors_carry_the_rule_line(engine: RuleEngine) -> None:
    script = "local a = 1\nlocal b = 2\nreturn a +* b\n"
    bad = Rule(id="bad-script", topic="a", script=script, origin="x.toml", origin_line=10)
    with pytest.raises(RuleCompileError) as info:
        await engine.check_rule(bad)
    assert info.value.rule_id == "bad-script"
    assert info.value.line == 3
    assert info.value.fields["file_line"] == 12
    assert info.value.status_code == 422
    with pytest.raises(RuleCompileError) as info2:
        await engine.check_rule(Rule(id="bad-when", topic="a", when="temperature >\n\n 3 3"))
    assert info2.value.line == 3


async def test_reload_reports_errors_and_keeps_good_rules(engine: RuleEngine) -> None:
    rules = [
        Rule(id="ok", topic="a", when="true"),
        Rule(id="broken", topic="a", when="temperature >>> 3"),
        Rule(id="plugin", topic="a", when="true", actions=({"type": "plugin", "name": "enrich"},)),  # type: ignore[arg-type]
        Rule(id="off", topic="a", when="true", enabled=False),
    ]
    report = await engine.reload(rules)
    assert report.result == "partial"
    assert report.version == 1
    assert (report.active, report.disabled) == (1, 1)
    errors = {e.rule_id: e for e in report.errors}
    assert isinstance(errors["broken"], RuleCompileError)
    assert errors["broken"].line == 1
    assert isinstance(errors["plugin"], RuleValidationError)
    assert "unknown plugin 'enrich'" in errors["plugin"].message
    status = {s.id: s.status for s in engine.rules()}
    assert status == {"ok": "active", "broken": "error", "plugin": "error", "off": "disabled"}
    matches = await engine.evaluate_batch([make_event({}, "a")])
    assert [(m.rule.id, m.ruleset_version) for m in matches] == [("ok", 1)]


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


async def test_quarantine_after_consecutive_failures(engine: RuleEngine) -> None:
    rules = [
        Rule(id="flaky", topic="a", script="if fail then error('no') end\nreturn true"),
        Rule(id="steady", topic="a", when="true"),
    ]
    await engine.reload(rules)
    before = metric("flux_rule_errors_total", rule="flaky", kind="runtime")
    ok, bad = {"fail": False}, {"fail": True}
    # fail, fail, ok resets the count; then three in a row quarantine (quarantine_after=3).
    await engine.evaluate_batch([make_event(p, "a") for p in (bad, bad, ok, bad)])
    assert engine.status("flaky").consecutive_failures == 1  # type: ignore[union-attr]
    await engine.evaluate_batch([make_event(bad, "a")])
    assert engine.status("flaky").status == "active"  # type: ignore[union-attr]
    matches = await engine.evaluate_batch([make_event(p, "a") for p in (bad, bad, ok, ok)])
    assert engine.status("flaky").status == "quarantined"  # type: ignore[union-attr]
    # Once quarantined the rule is skipped for the rest of the batch; the others keep running.
    assert [m.rule.id for m in matches] == ["steady"] * 4
    assert metric("flux_rule_errors_total", rule="flaky", kind="runtime") - before == 5
    assert metric("flux_rules_quarantined") == 1
    # A reload with the same version keeps it quarantined; unquarantine brings it back.
    await engine.reload(rules)
    assert engine.status("flaky").status == "quarantined"  # type: ignore[union-attr]
    assert await engine.unquarantine("flaky")
    matches = await engine.evaluate_batch([make_event(ok, "a")])
    assert [m.rule.id for m in matches] == ["flaky", "steady"]
    # A new version starts clean.
    await engine.evaluate_batch([make_event(bad, "a") for _ in range(3)])
    assert engine.status("flaky").status == "quarantined"  # type: ignore[union-attr]
    await engine.reload([rules[0].model_copy(update={"version": 2}), rules[1]])
    assert engine.status("flaky").status == "active"  # type: ignore[union-attr]


async def test_runaway_rule_is_quarantined_quickly(engine: RuleEngine) -> None:
    await engine.reload(
        [Rule(id="spin", topic="a", script="while true do end"), Rule(id="ok", topic="a", when="1")]
    )
    matches = await engine.evaluate_batch([make_event({}, "a") for _ in range(50)])
    assert len(matches) == 50
    status = engine.status("spin")
    assert status is not None and status.status == "quarantined"
    assert status.failures == 3  # not 50: the budget was burnt three times only


async def test_test_rule_reports_timeout(engine: RuleEngine) -> None:
    result = await engine.test_rule(
        Rule(id="spin", topic="a", when="(function() while 1 do end end)()"), {}
    )
    assert isinstance(result.error, RuleTimeout)
    assert not result.matched
    mismatch = await engine.test_rule(Rule(id="t", topic="a/b", when="true"), {}, "c")
    assert isinstance(mismatch.error, RuleValidationError)


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


async def test_topic_filters_select_rules(engine: RuleEngine) -> None:
    rules = [
        Rule(id="tele", topic="devices/+/telemetry", when="true"),
        Rule(id="all", topic="devices/#", when="true"),
        Rule(id="exact", topic="devices/x/status", when="true"),
    ]
    await engine.reload(rules)
    events = [
        make_event({}, "devices/x/telemetry"),
        make_event({}, "devices/x/status"),
        make_event({}, "other/topic"),
    ]
    matches = await engine.evaluate_batch(events)
    assert [(m.event.topic, m.rule.id) for m in matches] == [
        ("devices/x/telemetry", "tele"),
        ("devices/x/telemetry", "all"),
        ("devices/x/status", "all"),
        ("devices/x/status", "exact"),
    ]
    assert metric("flux_rule_evaluations_total", rule="exact") >= 1


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


async def test_reload_swaps_versions_atomically(engine: RuleEngine) -> None:
    first = [Rule(id=f"r{k}", topic="a", when="true") for k in range(5)]
    second = [Rule(id=f"r{k}", topic="a", when="false") for k in range(5)] + [
        Rule(id="new", topic="a", when="true")
    ]
    r1 = await engine.reload(first)
    matches = await engine.evaluate_batch([make_event({}, "a")])
    assert {m.ruleset_version for m in matches} == {r1.version}
    assert len(matches) == 5
    r2 = await engine.reload(second)
    assert r2.version == r1.version + 1
    assert (r2.compiled, r2.reused) == (6, 0)
    matches = await engine.evaluate_batch([make_event({}, "a")])
    assert [(m.rule.id, m.ruleset_version) for m in matches] == [("new", r2.version)]
    r3 = await engine.reload(second)
    assert (r3.compiled, r3.reused) == (0, 6)  # compiled once per (id, version, source)


async def test_concurrent_reloads_coalesce(engine: RuleEngine) -> None:
    calls = 0

    def source(tag: str):  # type: ignore[no-untyped-def]
        async def load() -> list[Rule]:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0)
            return [Rule(id=tag, topic="a", when="true")]

        return load

    reports = await asyncio.gather(*(engine.reload(source(f"r{i}")) for i in range(5)))
    # The first call starts a reload; the four made while it runs share one more reload,
    # which reads the newest source.
    assert calls <= 2
    assert len({r.version for r in reports}) == calls
    assert [s.id for s in engine.rules()] == ["r4"]
    assert reports[-1].version == engine.version


async def test_events_keep_flowing_during_reloads_each_once() -> None:
    async with RuleEngine(offload=True) as engine:
        await engine.reload([Rule(id="v0", topic="a", when="true")])
        seen: list[tuple[str, int]] = []
        stop = False

        async def feed() -> None:
            n = 0
            while not stop:
                batch = [make_event({"n": n + i}, "a") for i in range(20)]
                n += 20
                for m in await engine.evaluate_batch(batch):
                    seen.append((m.event.id, m.ruleset_version))

        feeder = asyncio.create_task(feed())
        for version in range(1, 11):
            await engine.reload([Rule(id=f"v{version}", topic="a", when="true")])
        stop = True
        await feeder
        ids = [event_id for event_id, _ in seen]
        assert len(ids) == len(set(ids))  # every event matched by exactly one ruleset
        versions = [v for _, v in seen]
        assert versions == sorted(versions)


async def test_reload_leaves_no_growth_behind() -> None:
    baseline_runtimes = LuaSandbox.live_count()
    async with RuleEngine() as engine:
        assert LuaSandbox.live_count() == baseline_runtimes + 1
        rules = [
            Rule(id=f"r{k}", topic="a", script=f"state.x = {k}\nreturn true") for k in range(20)
        ]
        await engine.reload(rules)
        await engine.evaluate_batch([make_event({}, "a")])
        engine.sandbox.collect()
        before = engine.sandbox.memory_kib()
        for round_ in range(30):
            changed = [r.model_copy(update={"version": round_ + 2}) for r in rules]
            await engine.reload(changed)
            await engine.evaluate_batch([make_event({"n": round_}, "a")])
        await engine.reload(rules)
        gc.collect()
        engine.sandbox.collect()
        after = engine.sandbox.memory_kib()
        assert after < before * 1.25 + 64, (before, after)
        assert len(engine._cache or ()) == 20
    gc.collect()
    assert LuaSandbox.live_count() == baseline_runtimes


async def test_engine_refuses_reentry_and_use_after_close() -> None:
    engine = RuleEngine()
    async with engine:
        with pytest.raises(RuntimeError):
            await engine.__aenter__()
    from flux.errors import NotReady

    with pytest.raises(NotReady):
        await engine.evaluate_batch([make_event({}, "a")])


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
