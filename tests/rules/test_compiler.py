"""Compiling single rules: errors with lines, the compile cache, a whole rule set at once."""

from __future__ import annotations

import pytest

from flux.rules import Rule, RuleCompileError, RuleValidationError
from flux.rules.compiler import (
    CompileCache,
    Location,
    compile_rule,
    compile_rules,
    locate,
    validate_rule,
)
from flux.rules.sandbox import LuaSandbox

ENRICH = ({"type": "plugin", "name": "enrich"},)


def test_compile_errors_carry_the_rule_line() -> None:
    sandbox = LuaSandbox()
    script = "local a = 1\nlocal b = 2\nreturn a +* b\n"
    bad = Rule(id="bad-script", topic="a", script=script, origin="x.toml", origin_line=10)
    with pytest.raises(RuleCompileError) as info:
        validate_rule(sandbox, bad, frozenset())
    assert info.value.rule_id == "bad-script"
    assert info.value.line == 3
    assert info.value.fields["file_line"] == 12
    assert info.value.status_code == 422
    with pytest.raises(RuleCompileError) as info2:
        validate_rule(sandbox, Rule(id="bad-when", topic="a", when="temperature >\n\n 3 3"), set())
    assert info2.value.line == 3


def test_validate_rule_checks_plugins_only_when_given_them() -> None:
    sandbox = LuaSandbox()
    rule = Rule(id="plug", topic="a", when="true", actions=ENRICH)  # type: ignore[arg-type]
    with pytest.raises(RuleValidationError, match="unknown plugin 'enrich'"):
        validate_rule(sandbox, rule, set())
    validate_rule(sandbox, rule, {"enrich"})
    validate_rule(sandbox, rule, None)


def test_compiled_rule_runs_alone() -> None:
    compiled = compile_rule(LuaSandbox(), Rule(id="r", topic="a", script="return 1 + 1"))
    assert compiled.fn() == 2
    assert compiled.compile_seconds >= 0


def test_locate_splits_lua_messages() -> None:
    assert locate("rule-1:3: boom: again") == Location("rule-1", 3, "boom: again")
    assert locate("no location here") == Location(None, None, "no location here")


def test_cache_compiles_once_per_key_and_forgets_what_is_not_retained() -> None:
    cache = CompileCache(LuaSandbox())
    rule = Rule(id="r", topic="a", when="x > 1")
    first = cache.get(rule)
    same_key = rule.model_copy(update={"topic": "b"})
    second = cache.get(same_key)
    assert second.fn is first.fn and second.rule is same_key
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    newer = rule.model_copy(update={"version": 2})
    assert cache.get(newer).fn is not first.fn
    cache.retain([newer.compile_key])
    assert len(cache) == 1
    assert cache.get(rule).fn is not first.fn
    assert cache.misses == 3


def test_compile_rules_keeps_the_good_and_reports_the_rest() -> None:
    cache = CompileCache(LuaSandbox())
    rules = [
        Rule(id="ok", topic="a", when="true"),
        Rule(id="ok", topic="b", when="true"),
        Rule(id="broken", topic="a", when="x >"),
        Rule(id="plug", topic="a", when="true", actions=ENRICH),  # type: ignore[arg-type]
        Rule(id="off", topic="a", when="true", enabled=False),
    ]
    result = compile_rules(cache, rules, set())
    assert [c.rule.id for c in result.compiled] == ["ok"]
    assert [r.id for r in result.disabled] == ["off"]
    errors = {e.rule_id: e for e in result.errors}
    assert set(errors) == {"ok", "broken", "plug"}
    assert "duplicate rule id 'ok'" in errors["ok"].message
    assert isinstance(errors["broken"], RuleCompileError)
    assert isinstance(errors["plug"], RuleValidationError)
    assert (result.fresh, result.reused) == (2, 0)  # a rule that does not compile is not cached
    assert result.keys() == [rules[0].compile_key, rules[4].compile_key]
    again = compile_rules(cache, rules, {"enrich"})
    assert [c.rule.id for c in again.compiled] == ["ok", "plug"]
    assert (again.fresh, again.reused) == (1, 2)
