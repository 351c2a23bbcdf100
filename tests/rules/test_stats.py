"""Per-rule status and counters, kept in step with the Prometheus metrics."""

from __future__ import annotations

import logging

import pytest

from flux.rules import Rule, RuleEngine

from .conftest import make_event, metric


async def test_counters_and_metrics_agree(engine: RuleEngine) -> None:
    rules = [
        Rule(id="stats-hot", topic="s/+", when="temperature > 30"),
        Rule(id="stats-fail", topic="s/+", script="if fail then error('no') end\nreturn false"),
    ]
    await engine.reload(rules)
    before = {
        (name, rule.id): metric(name, rule=rule.id)
        for name in ("flux_rule_evaluations_total", "flux_rule_matches_total")
        for rule in rules
    }
    errors_before = metric("flux_rule_errors_total", rule="stats-fail", kind="runtime")
    payloads = [{"temperature": 31}, {"temperature": 20, "fail": True}, {"temperature": 40}]
    await engine.evaluate_batch([make_event(p, f"s/d{i}") for i, p in enumerate(payloads)])
    hot, fail = engine.status("stats-hot"), engine.status("stats-fail")
    assert hot is not None and fail is not None
    assert (hot.evaluations, hot.matches, hot.failures) == (3, 2, 0)
    assert (fail.evaluations, fail.matches, fail.failures) == (3, 0, 1)
    assert fail.consecutive_failures == 0  # the evaluation after the failure succeeded
    assert fail.last_error is not None and fail.last_error["message"] == "no"
    assert fail.last_error["line"] == 1
    for status in (hot, fail):
        evaluations = ("flux_rule_evaluations_total", status.id)
        matches = ("flux_rule_matches_total", status.id)
        assert metric(evaluations[0], rule=status.id) - before[evaluations] == status.evaluations
        assert metric(matches[0], rule=status.id) - before[matches] == status.matches
    assert metric("flux_rule_errors_total", rule="stats-fail", kind="runtime") == errors_before + 1


async def test_statuses_list_every_rule_sorted_by_id(engine: RuleEngine) -> None:
    await engine.reload(
        [
            Rule(id="z-active", topic="a", when="true"),
            Rule(id="m-broken", topic="a", when="x >"),
            Rule(id="a-off", topic="a", when="true", enabled=False),
        ]
    )
    statuses = engine.rules()
    assert [(s.id, s.status) for s in statuses] == [
        ("a-off", "disabled"),
        ("m-broken", "error"),
        ("z-active", "active"),
    ]
    broken = statuses[1]
    assert broken.rule is None and broken.last_error is not None
    assert broken.last_error["error"] == "RuleCompileError"
    assert broken.last_error["line"] == 1
    assert statuses[0].to_dict()["rule"]["enabled"] is False
    assert engine.status("nope") is None


async def test_a_rule_gone_after_reload_leaves_no_counters_or_series(engine: RuleEngine) -> None:
    rules = [
        Rule(id="stats-gone", topic="a", script="error('x')"),
        Rule(id="stats-kept", topic="a", when="true"),
    ]
    await engine.reload(rules)
    await engine.evaluate_batch([make_event({}, "a")])
    assert metric("flux_rule_evaluations_total", rule="stats-gone") >= 1
    assert metric("flux_rule_errors_total", rule="stats-gone", kind="runtime") >= 1
    kept = metric("flux_rule_evaluations_total", rule="stats-kept")
    await engine.reload([rules[1]])
    assert engine.status("stats-gone") is None
    assert metric("flux_rule_evaluations_total", rule="stats-gone") == 0
    assert metric("flux_rule_errors_total", rule="stats-gone", kind="runtime") == 0
    assert metric("flux_rule_evaluations_total", rule="stats-kept") == kept
    status = engine.status("stats-kept")
    assert status is not None and status.evaluations == 1
    await engine.reload(rules)
    status = engine.status("stats-gone")
    assert status is not None and (status.evaluations, status.failures) == (0, 0)


async def test_the_first_failure_of_a_run_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    rule = Rule(id="flaky", topic="a", script="if fail then error('no') end\nreturn true")
    bad, ok = make_event({"fail": True}, "a"), make_event({"fail": False}, "a")
    before = metric("flux_rule_errors_total", rule="flaky", kind="runtime")
    async with RuleEngine(quarantine_after=100) as engine:
        await engine.reload([rule])
        with caplog.at_level(logging.WARNING, logger="flux.rules.engine"):
            await engine.evaluate_batch([bad, bad, bad])
            await engine.evaluate_batch([bad])
            await engine.evaluate_batch([ok, bad])
        status = engine.status("flaky")
        assert status is not None and (status.failures, status.consecutive_failures) == (5, 1)
    failed = [r for r in caplog.records if r.getMessage().startswith("rule flaky failed")]
    assert len(failed) == 2  # the first failure, and the first after a success
    assert metric("flux_rule_errors_total", rule="flaky", kind="runtime") - before == 5


async def test_quarantine_is_logged_and_counted_in_the_gauges(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rules = [
        Rule(id="spin", topic="a", script="error('always')"),
        Rule(id="ok", topic="a", when="1"),
    ]
    async with RuleEngine(quarantine_after=2) as engine:
        await engine.reload(rules)
        assert (metric("flux_rules_active"), metric("flux_rules_quarantined")) == (2, 0)
        with caplog.at_level(logging.ERROR, logger="flux.rules.engine"):
            await engine.evaluate_batch([make_event({}, "a"), make_event({}, "a")])
        assert "rule spin quarantined after 2 consecutive failures; last: always" in caplog.text
        assert (metric("flux_rules_active"), metric("flux_rules_quarantined")) == (1, 1)
        assert await engine.unquarantine("spin")
        assert not await engine.unquarantine("spin")
        assert not await engine.unquarantine("unknown")
        assert (metric("flux_rules_active"), metric("flux_rules_quarantined")) == (2, 0)
    assert (metric("flux_rules_active"), metric("flux_rules_quarantined")) == (0, 0)


async def test_each_rule_gets_its_share_of_the_time_and_the_shares_add_up(
    engine: RuleEngine,
) -> None:
    """Rules run fused in one Lua function; the sampled work still tells them apart."""
    busy = "local s = 0\nfor i = 1, 3000 do s = s + i % 7 end\nreturn s < 0"
    await engine.reload(
        [
            Rule(id="time-cheap", topic="t/+", when="temperature > 30"),
            Rule(id="time-busy", topic="t/busy", script=busy),
        ]
    )
    sum_before = metric("flux_rule_eval_seconds_sum")
    seconds_before = {
        rule: metric("flux_rule_eval_seconds_total", rule=rule)
        for rule in ("time-cheap", "time-busy")
    }
    for _ in range(5):
        events = [make_event({"temperature": 20 + i % 15}, f"t/d{i}") for i in range(180)]
        events += [make_event({"temperature": 25}, "t/busy") for _ in range(20)]
        await engine.evaluate_batch(events)
    added = {
        rule: metric("flux_rule_eval_seconds_total", rule=rule) - before
        for rule, before in seconds_before.items()
    }
    assert sum(added.values()) == pytest.approx(metric("flux_rule_eval_seconds_sum") - sum_before)
    # The busy rule runs ~100x the instructions of the cheap one on a tenth of the events.
    assert added["time-busy"] > 0.8 * sum(added.values())
    assert added["time-cheap"] > 0
    busy_status, cheap_status = engine.status("time-busy"), engine.status("time-cheap")
    assert busy_status is not None and cheap_status is not None
    assert busy_status.seconds == pytest.approx(added["time-busy"])
    assert busy_status.to_dict()["seconds"] > cheap_status.to_dict()["seconds"]
    await engine.reload([Rule(id="time-cheap", topic="t/+", when="true")])
    assert metric("flux_rule_eval_seconds_total", rule="time-busy") == 0
