"""The engine: lifecycle, reload atomicity and coalescing, quarantine across reloads."""

from __future__ import annotations

import asyncio
import gc

import pytest

from flux.errors import NotReady
from flux.rules import (
    Rule,
    RuleCompileError,
    RuleEngine,
    RuleValidationError,
)
from flux.rules.sandbox import LuaSandbox

from .conftest import make_event, metric


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
    gc.collect()  # runtimes of earlier tests awaiting collection are not this test's
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
    with pytest.raises(NotReady):
        await engine.evaluate_batch([make_event({}, "a")])


async def test_check_rule_asks_for_the_plugins_known_now() -> None:
    plugins: set[str] = set()
    uses_enrich = Rule(
        id="plug",
        topic="a",
        when="true",
        actions=({"type": "plugin", "name": "enrich"},),  # type: ignore[arg-type]
    )
    async with RuleEngine(known_plugins=lambda: plugins) as engine:
        with pytest.raises(RuleValidationError, match="unknown plugin 'enrich'"):
            await engine.check_rule(uses_enrich)
        plugins.add("enrich")
        await engine.check_rule(uses_enrich)
        with pytest.raises(RuleCompileError) as info:
            await engine.check_rule(Rule(id="bad", topic="a", when="x >"))
        assert info.value.rule_id == "bad"
