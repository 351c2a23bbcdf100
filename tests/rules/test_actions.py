"""Action dispatch, payload building and the hop-count loop cut."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from flux.rules import (
    ActionExecutor,
    AlertAction,
    PublishAction,
    Rule,
    RuleMatch,
    alert_row,
    publish_message,
    webhook_request,
)
from flux.rules.model import WebhookAction

from .conftest import make_event, metric


def match_for(
    rule: Rule, payload: dict[str, Any], output: dict[str, Any] | None = None, hops: int = 0
) -> RuleMatch:
    return RuleMatch(rule, make_event(payload, "devices/d1/telemetry", hops=hops), output, 7)


RULE = Rule(
    id="hot",
    topic="devices/+/telemetry",
    when="temperature > 30",
    actions=(
        AlertAction(type="alert", severity="critical"),
        PublishAction(type="publish", topic="alerts/{device_id}/{rule_id}", qos=1),
    ),
)


def test_alert_row() -> None:
    match = match_for(RULE, {"temperature": 31}, {"why": "hot"})
    row = alert_row(match, RULE.actions[0])  # type: ignore[arg-type]
    assert row["rule_id"] == "hot"
    assert row["device_id"] == "d1"
    assert row["event_id"] == match.event.id
    assert row["severity"] == "critical"
    assert row["output"] == {"why": "hot"}
    assert row["created_at"].tzinfo is not None


def test_publish_message_default_and_templates() -> None:
    match = match_for(RULE, {"temperature": 31}, hops=2)
    message = publish_message(match, RULE.actions[1])  # type: ignore[arg-type]
    assert (message.topic, message.qos, message.retain, message.hops) == (
        "alerts/d1/hot",
        1,
        False,
        3,
    )
    document = orjson.loads(message.payload)
    assert document["payload"] == {"temperature": 31}
    assert document["ruleset_version"] == 7
    templated = PublishAction(
        type="publish",
        topic="x/{device_id}",
        payload={"t": "{payload.temperature}", "m": "id {event_id}"},
    )
    body = orjson.loads(publish_message(match, templated).payload)
    assert body == {"t": 31, "m": f"id {match.event.id}"}
    text = PublishAction(type="publish", topic="x", payload="T={payload.temperature}")
    assert publish_message(match, text).payload == b"T=31"


def test_webhook_request() -> None:
    action = WebhookAction(type="webhook", url="http://127.0.0.1:9/hook", headers={"x-a": "1"})
    request = webhook_request(match_for(RULE, {"t": 1}), action)
    assert request.headers == {"content-type": "application/json", "x-a": "1"}
    assert orjson.loads(request.body)["rule_id"] == "hot"
    assert request.timeout_s == 5.0


async def test_executor_dispatches_and_isolates_failures() -> None:
    executor = ActionExecutor(max_hops=4)
    alerts: list[dict[str, Any]] = []

    async def on_alert(match: RuleMatch, action: Any) -> None:
        alerts.append(alert_row(match, action))

    async def on_publish(match: RuleMatch, action: Any) -> None:
        raise ConnectionError("broker down")

    unregister_alert = executor.register("alert", on_alert)
    unregister_publish = executor.register("publish", on_publish)
    with pytest.raises(ValueError, match="already registered"):
        executor.register("alert", on_alert)
    before = metric("flux_action_executions_total", type="publish", result="error")
    matches = [match_for(RULE, {"temperature": 31}), match_for(RULE, {"temperature": 40})]
    report = await executor.execute(matches)
    assert (report.ok, report.failed, report.unhandled) == (2, 2, 0)
    assert len(alerts) == 2
    assert metric("flux_action_executions_total", type="publish", result="error") - before == 2
    unregister_alert()
    unregister_publish()
    assert executor.handler_count == 0
    report = await executor.execute(matches)
    assert report.unhandled == 4


async def test_loop_cut_by_hop_count() -> None:
    executor = ActionExecutor(max_hops=2)
    published: list[str] = []

    async def on_publish(match: RuleMatch, action: Any) -> None:
        published.append(match.event.id)

    executor.register("publish", on_publish)
    before = metric("flux_rule_loops_cut_total")
    report = await executor.execute([match_for(RULE, {}, hops=1), match_for(RULE, {}, hops=2)])
    assert report.loop_cut == 1
    assert len(published) == 1
    parent = make_event({"a": 1}, hops=1)
    child = executor.derive(parent, topic="devices/d2/derived", payload={"b": 2})
    assert child is not None and child.hops == 2 and child.source == "derived"
    assert executor.derive(child, topic="x", payload={}) is None
    assert metric("flux_rule_loops_cut_total") - before == 2
