"""Rule actions: dispatch matches to registered handlers, and build what each action sends.

The engine only decides *that* a rule matched; the handlers that write alert rows, publish MQTT
messages, queue webhooks or call plugins are registered by the app (they need the database,
the MQTT client, the plugin host). The payload building is here, as pure functions, so every
handler renders templates the same way.

Loops: an event derived by an action carries ``hops = parent.hops + 1``; ``derive`` refuses
(drops and counts) an event whose hop count would exceed ``max_hops``, and ``execute`` skips
``publish``/``plugin`` actions of matches whose event is already at ``max_hops``. A publish that
leaves the process over MQTT should carry ``hops`` (e.g. an MQTT v5 user property ``flux-hops``)
so ingest can restore it when the message comes back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flux.events import Event, PublishMessage, derive_event, json_bytes
from flux.rules import metrics
from flux.rules.batch import RuleMatch
from flux.rules.model import (
    Action,
    AlertAction,
    PublishAction,
    WebhookAction,
    render_template,
    render_value,
)

log = logging.getLogger(__name__)

#: Default for ``ActionExecutor(max_hops=...)``.
DEFAULT_MAX_HOPS = 8
#: Actions that create new events (and so can loop).
EMITTING_ACTIONS = frozenset({"publish", "plugin"})

Handler = Callable[[RuleMatch, Any], Awaitable[None]]


def template_context(match: RuleMatch) -> dict[str, Any]:
    """Return the values templates can use: ids, topic, ``payload.*`` and ``output.*``."""
    event = match.event
    return {
        "device_id": event.device_id,
        "rule_id": match.rule.id,
        "topic": event.topic,
        "event_id": event.id,
        "received_at": event.received_at,
        "payload": event.payload,
        "output": match.output or {},
    }


def alert_row(match: RuleMatch, action: AlertAction) -> dict[str, Any]:
    """Return the ``alerts`` row for an alert action (columns as in the store's schema)."""
    return {
        "rule_id": match.rule.id,
        "device_id": match.event.device_id,
        "event_id": match.event.id,
        "severity": action.severity,
        "output": match.output,
        "created_at": datetime.now(UTC),
    }


def default_document(match: RuleMatch) -> dict[str, Any]:
    """Return the JSON document sent when an action has no payload template."""
    event = match.event
    return {
        "rule_id": match.rule.id,
        "ruleset_version": match.ruleset_version,
        "event_id": event.id,
        "device_id": event.device_id,
        "topic": event.topic,
        "received_at": event.received_at,
        "payload": event.payload,
        "output": match.output,
    }


def publish_message(match: RuleMatch, action: PublishAction) -> PublishMessage:
    """Render a publish action's topic and payload templates for ``match``."""
    context = template_context(match)
    topic = render_template(action.topic, context, for_topic=True)
    body: bytes
    if action.payload is None:
        body = json_bytes(default_document(match))
    elif isinstance(action.payload, str):
        body = render_template(action.payload, context).encode()
    else:
        body = json_bytes(render_value(action.payload, context))
    return PublishMessage(
        topic=topic, payload=body, qos=action.qos, retain=action.retain, hops=match.event.hops + 1
    )


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """An HTTP POST rendered from a webhook action (the outbox stores and retries it)."""

    url: str
    body: bytes
    headers: dict[str, str]
    timeout_s: float


def webhook_request(match: RuleMatch, action: WebhookAction) -> WebhookRequest:
    """Return the POST for a webhook action: the default JSON document of the match."""
    headers = {"content-type": "application/json", **action.headers}
    return WebhookRequest(
        url=action.url,
        body=json_bytes(default_document(match)),
        headers=headers,
        timeout_s=action.timeout_s,
    )


@dataclass(slots=True)
class ExecutionReport:
    """Counts of one ``ActionExecutor.execute`` call."""

    ok: int = 0
    failed: int = 0
    unhandled: int = 0
    loop_cut: int = 0
    errors: list[str] = field(default_factory=list)


class ActionExecutor:
    """Dispatch each match's actions to the handler registered for the action type.

    A failing handler is logged (once per type until it succeeds again) and counted; it never
    stops the other actions. Handlers run one after another, in rule-then-action order.
    """

    def __init__(self, *, max_hops: int = DEFAULT_MAX_HOPS) -> None:
        if max_hops < 0:
            raise ValueError("max_hops must be >= 0")
        self.max_hops = max_hops
        self._handlers: dict[str, Handler] = {}
        self._failing: set[str] = set()
        # Looking a labelled child up costs more than the increment itself.
        self._counted: dict[tuple[str, str], Any] = {}

    def register(self, action_type: str, handler: Handler) -> Callable[[], None]:
        """Register the handler for ``action_type``; return a callable that unregisters it."""
        if action_type in self._handlers:
            raise ValueError(f"a handler for {action_type!r} actions is already registered")
        self._handlers[action_type] = handler

        def unregister() -> None:
            if self._handlers.get(action_type) is handler:
                del self._handlers[action_type]

        return unregister

    @property
    def handler_count(self) -> int:
        """Return how many handlers are registered."""
        return len(self._handlers)

    def derive(self, parent: Event, *, topic: str, payload: dict[str, Any]) -> Event | None:
        """Return an event derived from ``parent``, or ``None`` (counted) if it would loop."""
        if parent.hops + 1 > self.max_hops:
            metrics.RULE_LOOPS_CUT.inc()
            log.debug("loop cut: event %s at %d hops -> %s", parent.id, parent.hops, topic)
            return None
        return derive_event(parent, topic=topic, payload=payload)

    async def execute(self, matches: Sequence[RuleMatch]) -> ExecutionReport:
        """Run every action of every match; return what happened."""
        report = ExecutionReport()
        for match in matches:
            for action in match.rule.actions:
                await self._run(match, action, report)
        return report

    async def _run(self, match: RuleMatch, action: Action, report: ExecutionReport) -> None:
        kind = action.type
        if kind in EMITTING_ACTIONS and match.event.hops >= self.max_hops:
            report.loop_cut += 1
            metrics.RULE_LOOPS_CUT.inc()
            self._count(kind, "loop_cut")
            return
        handler = self._handlers.get(kind)
        if handler is None:
            report.unhandled += 1
            self._count(kind, "unhandled")
            return
        try:
            await handler(match, action)
        except Exception as exc:
            report.failed += 1
            report.errors.append(f"{match.rule.id}/{kind}: {exc}")
            self._count(kind, "error")
            if kind not in self._failing:
                self._failing.add(kind)
                log.exception(
                    "%s action of rule %s failed for event %s", kind, match.rule.id, match.event.id
                )
            return
        self._failing.discard(kind)
        report.ok += 1
        self._count(kind, "ok")

    def _count(self, kind: str, result: str) -> None:
        child = self._counted.get((kind, result))
        if child is None:
            child = self._counted[(kind, result)] = metrics.ACTION_EXECUTIONS.labels(
                type=kind, result=result
            )
        child.inc()


__all__ = [
    "DEFAULT_MAX_HOPS",
    "ActionExecutor",
    "ExecutionReport",
    "Handler",
    "PublishMessage",
    "WebhookRequest",
    "alert_row",
    "default_document",
    "publish_message",
    "template_context",
    "webhook_request",
]
