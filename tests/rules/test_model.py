from __future__ import annotations

from pathlib import Path

import pytest

from flux.rules import (
    PublishAction,
    Rule,
    RuleValidationError,
    check_plugins,
    load_rules_path,
    load_rules_text,
    parse_rule,
)
from flux.rules.model import MAX_SOURCE_BYTES, render_template, render_value

BASE = {"id": "r1", "topic": "devices/+/telemetry", "when": "temperature > 30"}


def test_valid_rule_defaults() -> None:
    rule = parse_rule(BASE)
    assert rule.enabled is True
    assert rule.version == 1
    assert rule.kind == "when"
    assert rule.actions == ()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"id": "Bad Id"}, "id"),
        ({"id": "x" * 65}, "id"),
        ({"topic": "devices/#/x"}, "'#' must be"),
        ({"script": "return true"}, "exactly one"),
        ({"when": None}, "exactly one"),
        ({"when": "   "}, "empty"),
        ({"when": "x" * (MAX_SOURCE_BYTES + 1)}, "limit"),
        ({"actions": [{"type": "sms"}]}, "actions"),
        ({"actions": [{"type": "publish", "topic": "a/+/b"}]}, "wildcards"),
        ({"actions": [{"type": "publish", "topic": "a/{nope}"}]}, "unknown placeholder"),
        ({"actions": [{"type": "publish", "topic": "a", "qos": 2}]}, "qos"),
        ({"actions": [{"type": "webhook", "url": "ftp://x"}]}, "http"),
        ({"actions": [{"type": "alert", "severity": "meh"}]}, "severity"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_rules_raise_validation_errors(change: dict[str, object], fragment: str) -> None:
    with pytest.raises(RuleValidationError) as info:
        parse_rule({**BASE, **change})
    assert fragment in str(info.value)
    assert info.value.status_code == 422


def test_compile_key_follows_source_and_version() -> None:
    rule = parse_rule(BASE)
    assert rule.compile_key == parse_rule({**BASE, "description": "x"}).compile_key
    assert rule.compile_key != parse_rule({**BASE, "when": "temperature > 31"}).compile_key
    assert rule.compile_key != parse_rule({**BASE, "version": 2}).compile_key


def test_unknown_plugin_is_a_clear_validation_error() -> None:
    rule = parse_rule({**BASE, "actions": [{"type": "plugin", "name": "enrich"}]})
    with pytest.raises(RuleValidationError, match="unknown plugin 'enrich'"):
        check_plugins(rule, set())
    check_plugins(rule, {"enrich"})


def test_templates_render_ids_and_fields() -> None:
    context = {
        "device_id": "d/1+",
        "rule_id": "hot",
        "payload": {"temperature": 31.0, "nested": {"a": [1, 2]}},
        "output": {"level": 3},
    }
    assert render_template("alerts/{device_id}/{rule_id}", context, for_topic=True) == (
        "alerts/d_1_/hot"
    )
    assert render_template("t={payload.temperature} {{x}} {output.level}", context) == "t=31 {x} 3"
    assert render_template("{payload.missing}", context) == ""
    assert render_value({"t": "{payload.temperature}", "s": "v{output.level}"}, context) == {
        "t": 31.0,
        "s": "v3",
    }
    assert render_value(["{payload.nested.a.1}"], context) == [2]


def test_publish_action_defaults() -> None:
    action = PublishAction(type="publish", topic="a/{device_id}")
    assert (action.qos, action.retain, action.payload) == (0, False, None)


def test_toml_loading_reports_bad_rules_and_keeps_good_ones() -> None:
    text = '''
[[rules]]
id = "good"
topic = "devices/+/telemetry"
when = "temperature > 30"

[[rules]]
id = "BAD"
topic = "devices/+/telemetry"
when = "x"

[[rules]]
id = "script-rule"
topic = "a/#"
script = """
local x = 1
return x
"""
'''
    report = load_rules_text(text, origin="mem.toml")
    assert [r.id for r in report.rules] == ["good", "script-rule"]
    assert len(report.errors) == 1
    error = report.errors[0]
    assert error.fields["file"] == "mem.toml"
    assert error.fields["index"] == 1
    good, script = report.rules
    assert good.origin == "mem.toml"
    assert good.origin_line == 5
    assert script.origin_line == 16  # the line after script = """


def test_toml_syntax_error_has_a_line() -> None:
    report = load_rules_text("[[rules]]\nid = \n", origin="broken.toml")
    assert not report.rules
    assert report.errors[0].fields["line"] == 2


def test_directory_loading_detects_duplicates(tmp_path: Path) -> None:
    rule = '[[rules]]\nid = "same"\ntopic = "a"\nwhen = "true"\n'
    (tmp_path / "a.toml").write_text(rule)
    (tmp_path / "b.toml").write_text(rule)
    (tmp_path / "ignored.txt").write_text("nothing")
    report = load_rules_path(tmp_path)
    assert [r.id for r in report.rules] == ["same"]
    assert "duplicate rule id" in report.errors[0].message
    assert load_rules_path(tmp_path / "missing").errors


def test_rule_is_frozen() -> None:
    rule = Rule(id="r", topic="a", when="true")
    with pytest.raises(ValueError, match="frozen"):
        rule.id = "other"  # type: ignore[misc]
