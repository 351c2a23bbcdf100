"""The Prometheus alert rules are valid and do what their unit tests say (real promtool)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.harness import require_tool

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = RULES_DIR / "flux-alerts.yml"
RULE_TESTS = RULES_DIR / "flux-alerts.test.yml"
#: The alerts the design and the operators' issue ask for, besides the plugin pools'.
ALERTS = (
    "HighEventLatency",
    "DeadLettersRising",
    "EventBusSaturated",
    "DatabaseUnavailable",
    "MqttDisconnected",
    "SinkBacklogOld",
    "PluginPoolLowHitRate",
    "PluginPoolExhausted",
    "PluginFaulting",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = require_tool("promtool", install="prometheus")
    return subprocess.run(
        [binary, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_every_alert_has_unit_tests_firing_and_not_firing_and_they_pass() -> None:
    tests = RULE_TESTS.read_text(encoding="utf-8")
    for alert in ALERTS:
        assert f"alert: {alert}" in RULES.read_text(encoding="utf-8")
        cases = tests.split(f"alertname: {alert}\n")[1:]
        firing = [case for case in cases if case.lstrip().startswith("exp_alerts:\n")]
        quiet = [case for case in cases if case.lstrip().startswith("exp_alerts: []")]
        assert firing and quiet, f"{alert} needs a firing and a not-firing case"
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
