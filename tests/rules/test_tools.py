from __future__ import annotations

from pathlib import Path

from flux.rules import run_rule_test, validate_rules

from .conftest import RULES_DIR


def test_validate_reports_errors_with_lines(tmp_path: Path) -> None:
    (tmp_path / "ok.toml").write_text('[[rules]]\nid = "fine"\ntopic = "a"\nwhen = "x > 1"\n')
    (tmp_path / "bad.toml").write_text(
        '[[rules]]\nid = "broken"\ntopic = "a"\nscript = """\nlocal a = 1\nreturn a +\n"""\n'
        '\n[[rules]]\nid = "plug"\ntopic = "a"\nwhen = "true"\n'
        'actions = [{ type = "plugin", name = "enrich" }]\n'
    )
    report = validate_rules(tmp_path, known_plugins=set())
    assert not report.ok
    assert report.valid == ["fine"]
    errors = {e.rule_id: e for e in report.errors}
    assert errors["broken"].line == 3
    assert errors["broken"].fields["file_line"] == 7
    assert errors["broken"].fields["file"].endswith("bad.toml")
    assert "unknown plugin" in errors["plug"].message
    assert report.to_dict()["ok"] is False


def test_run_rule_test_by_id() -> None:
    result = run_rule_test("overheat", {"temperature": 35, "humidity": 20}, path=RULES_DIR)
    assert result.matched and result.error is None and result.elapsed_s > 0
    rising = run_rule_test(
        "temperature-rising-fast",
        {"temperature": 30},
        path=RULES_DIR,
        state={"temperature": 20, "at": 0},
    )
    assert rising.error is None


def test_run_rule_test_unknown_rule() -> None:
    import pytest

    from flux.rules import RuleValidationError

    with pytest.raises(RuleValidationError, match="no rule 'nope'"):
        run_rule_test("nope", {}, path=RULES_DIR)
