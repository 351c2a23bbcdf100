"""Testing one rule against a sample payload, apart from the live ruleset and its state."""

from __future__ import annotations

from flux.rules import (
    Rule,
    RuleCompileError,
    RuleEngine,
    RuleTimeout,
    RuleValidationError,
)
from flux.rules.sandbox import LuaSandbox
from flux.rules.testing import run_test, sample_event, sample_topic

from .conftest import make_event

COUNTER = Rule(
    id="counter", topic="devices/+/t", script="state.n = (state.n or 0) + 1\nreturn {n = state.n}"
)


async def test_test_rule_reports_timeout(engine: RuleEngine) -> None:
    result = await engine.test_rule(
        Rule(id="spin", topic="a", when="(function() while 1 do end end)()"), {}
    )
    assert isinstance(result.error, RuleTimeout)
    assert not result.matched
    mismatch = await engine.test_rule(Rule(id="t", topic="a/b", when="true"), {}, "c")
    assert isinstance(mismatch.error, RuleValidationError)


def test_sample_topics_fill_the_filter_in() -> None:
    assert sample_topic(Rule(id="r", topic="devices/+/telemetry", when="1")) == (
        "devices/test-device/telemetry"
    )
    assert sample_topic(Rule(id="r", topic="devices/+/x/#", when="1"), "d7") == "devices/d7/x/test"
    event = sample_event({"device_id": "p1"}, "plain/topic", None, 12.5)
    assert (event.device_id, event.received_at, event.source) == ("p1", 12.5, "http")
    assert sample_event({}, "devices/d2/t", "given", None).device_id == "given"


async def test_a_test_uses_its_own_state_never_the_live_one(engine: RuleEngine) -> None:
    await engine.reload([COUNTER])
    [live] = await engine.evaluate_batch([make_event({}, "devices/d1/t")])
    assert live.output == {"n": 1}
    seeded = await engine.test_rule(COUNTER, {}, device_id="d1", state={"n": 10})
    assert seeded.matched and seeded.output == {"n": 11} and seeded.error is None
    fresh = await engine.test_rule(COUNTER, {}, device_id="d1")
    assert fresh.output == {"n": 1}
    [live] = await engine.evaluate_batch([make_event({}, "devices/d1/t")])
    assert live.output == {"n": 2}
    assert engine.sandbox.state_devices("counter") == 1


def test_a_compile_error_is_returned_not_raised() -> None:
    result = run_test(LuaSandbox(), Rule(id="bad", topic="a", when="x >"), {})
    assert isinstance(result.error, RuleCompileError)
    assert not result.matched and result.output is None
    assert result.to_dict()["error"]["rule_id"] == "bad"


def test_run_test_matches_fused_or_not() -> None:
    sandbox = LuaSandbox()
    rule = Rule(id="hot", topic="devices/+/t", script="if t > 30 then return {t = t} end")
    for fuse in (True, False):
        hot = run_test(sandbox, rule, {"t": 31}, fuse=fuse)
        assert (hot.matched, hot.output, hot.error) == (True, {"t": 31}, None)
        cold = run_test(sandbox, rule, {"t": 3}, fuse=fuse)
        assert (cold.matched, cold.output, cold.error) == (False, None, None)
        assert cold.to_dict() == {
            "rule_id": "hot",
            "matched": False,
            "output": None,
            "elapsed_s": cold.elapsed_s,
            "error": None,
        }
