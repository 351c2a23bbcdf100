"""Rulesets: fused groups, topic plans, quarantine masks and line mapping."""

from __future__ import annotations

from collections.abc import Sequence

from flux.rules import Rule, RuleEngine
from flux.rules.compiler import compile_rule
from flux.rules.ruleset import GROUP_SIZE, INTERNAL_NAMES, Ruleset, generate_group
from flux.rules.sandbox import LuaSandbox

from .conftest import make_event, metric


def build(rules: Sequence[Rule], *, fuse: bool = True, version: int = 1) -> Ruleset:
    sandbox = LuaSandbox()
    return Ruleset(
        sandbox=sandbox,
        version=version,
        compiled=[compile_rule(sandbox, rule) for rule in rules],
        quarantine_after=3,
        fuse=fuse,
    )


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


async def test_fused_internals_are_invisible_to_rules(engine: RuleEngine) -> None:
    probe = " and ".join(f"{name} == nil" for name in INTERNAL_NAMES)
    assert "__fx_meter == nil" in probe and "__fx_functions == nil" in probe
    await engine.reload([Rule(id="probe", topic="a", when=probe)])
    assert len(await engine.evaluate_batch([make_event({}, "a")])) == 1


def test_topics_with_the_same_rules_share_a_plan() -> None:
    ruleset = build(
        [
            Rule(id="tele", topic="devices/+/telemetry", when="true"),
            Rule(id="all", topic="devices/#", when="true"),
        ]
    )
    first = ruleset.plan("devices/a/telemetry")
    assert first[1] == (1, 2)
    assert ruleset.plan("devices/b/telemetry") == first
    status = ruleset.plan("devices/a/status")
    assert status[1] == (2,) and status[0] != first[0]
    assert ruleset.plan("elsewhere") == (0, ())
    assert ruleset.plan_rules == {first[0]: (1, 2), status[0]: (2,)}


def test_quarantine_masks_a_rule_out_until_unquarantined() -> None:
    ruleset = build(
        [Rule(id="a", topic="t/#", when="true"), Rule(id="b", topic="t/#", when="true")]
    )
    assert ruleset.plan("t/x")[1] == (1, 2)
    ruleset.quarantine(1)
    assert ruleset.plan("t/x")[1] == (2,)
    assert ruleset.active_count == 1
    assert ruleset.unquarantine(1)
    assert not ruleset.unquarantine(1)
    assert ruleset.plan("t/x")[1] == (1, 2)
    assert ruleset.consecutive_failures(1) == 0
    assert ruleset.active_count == 2


def test_quarantined_ids_given_at_build_are_masked_out() -> None:
    sandbox = LuaSandbox()
    rules = [Rule(id="a", topic="t", when="true"), Rule(id="b", topic="t", when="true")]
    ruleset = Ruleset(
        sandbox=sandbox,
        version=2,
        compiled=[compile_rule(sandbox, rule) for rule in rules],
        quarantine_after=3,
        quarantined={"b", "gone"},
    )
    assert ruleset.quarantined == {2}
    assert ruleset.plan("t")[1] == (1,)


def test_groups_cover_the_rules_fused_or_generic() -> None:
    rules = [Rule(id=f"r{k}", topic="t", when="true") for k in range(GROUP_SIZE + 3)]
    fused = build(rules, version=4)
    assert [(g.first, g.last, g.fused) for g in fused.groups] == [
        (1, GROUP_SIZE, True),
        (GROUP_SIZE + 1, GROUP_SIZE + 3, True),
    ]
    assert fused.groups[1].chunkname == "__fx_ruleset4_2"
    generic = build(rules, fuse=False)
    assert [g.fused for g in generic.groups] == [False, False]


def test_generated_group_marks_where_each_expression_starts() -> None:
    rules = [
        (1, Rule(id="when", topic="t", when="x > 1\nand y")),
        (2, Rule(id="script", topic="t", script="return true")),
        (3, Rule(id="stateful", topic="t", when="state.n == nil")),
    ]
    source, starts = generate_group(rules, "prefix:")
    lines = source.split("\n")
    assert set(starts) == {1, 3}
    assert lines[starts[1] - 1] == "__fx_value = (x > 1"
    assert lines[starts[3] - 1] == "__fx_value = (state.n == nil"
    assert '__fx_state("prefix:stateful", __fx_device)' in source
    assert "__fx_functions[2]()" in source


def test_lines_map_into_the_rule_source() -> None:
    ruleset = build(
        [
            Rule(id="first", topic="t", when="true"),
            Rule(id="multi", topic="t", when="a\nand\nb"),
            Rule(id="script", topic="t", script="local x = 1\nreturn x"),
        ],
        version=9,
    )
    start = ruleset.groups[0].starts[2]
    chunk = "__fx_ruleset9_1"
    assert ruleset.message_line(2, f"{chunk}:{start + 2}: boom") == ("boom", 3)
    assert ruleset.message_line(2, f"{chunk}:{start + 3}: past the end") == ("past the end", None)
    assert ruleset.message_line(3, "script:2: own chunk") == ("own chunk", 2)
    assert ruleset.message_line(3, "no location") == ("no location", None)
    assert ruleset.rule_line(2, "=" + chunk, start) == 1
    assert ruleset.rule_line(2, False, False) is None
