"""Every sink of the gateway: built from ``[sinks.*]`` plus the two built-in ones, fed by the
store, reported to operators.

Built in: ``local`` (rule ``publish`` actions, to the gateway's own broker) and ``webhooks``
(rule ``webhook`` actions). Configured: one per ``[sinks.<name>]`` (``mqtt`` or ``http``).
Events reach a configured sink when their topic matches its ``topics``, or through a rule's
``forward`` action; either way the row is committed with the batch that caused it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, Self

from sqlalchemy.ext.asyncio import AsyncEngine

from flux.config import (
    BaseSinkConfig,
    HttpSinkConfig,
    MqttSinkConfig,
    Settings,
)
from flux.errors import ConfigError, NotFound
from flux.events import Event, json_bytes
from flux.ingest._gmqtt import MQTTv50
from flux.metrics import DEGRADED
from flux.rules import PublishAction, RuleMatch, WebhookAction, publish_message, webhook_request
from flux.sinks.http import HttpTransport
from flux.sinks.metrics import (
    SINK_ALERT_AFTER,
    SINK_BACKLOG,
    SINK_BACKLOG_BYTES,
    SINK_OLDEST_AGE,
)
from flux.sinks.mqtt import MqttSession, MqttTransport
from flux.sinks.outbox import OutboxReader
from flux.sinks.rows import OutboxRow, TopicTemplate, envelope, new_row_id
from flux.sinks.sender import OrderedSink
from flux.sinks.webhooks import WEBHOOKS, WebhookSink
from flux.tasks import cancel_and_wait
from flux.topics import TopicMatcher

log = logging.getLogger(__name__)

LOCAL = "local"
#: How often backlog gauges and the ``sink_backlog`` degraded reason are refreshed.
MONITOR_S = 1.0
#: Rows an MQTT sink may have sent and not yet confirmed (it writes many per socket write).
MQTT_WINDOW = 4_000


class Sink(Protocol):
    """What the manager and the API see of a sink (an ``OrderedSink`` or the webhooks)."""

    name: str
    paused: bool
    leased: bool
    backlog_rows: int
    backlog_bytes: int
    max_bytes: int
    sent: int

    @property
    def error(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    @property
    def full(self) -> bool: ...

    def committed(self, rows: Sequence[OutboxRow]) -> None: ...

    async def wait_for_room(self) -> None: ...

    def oldest_age_s(self) -> float: ...

    def send_rate(self) -> float: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


class _Route:
    """How the events of one configured sink are rendered into its rows."""

    __slots__ = ("config", "name", "qos", "retain", "template", "wants_envelope")

    def __init__(self, name: str, config: MqttSinkConfig | HttpSinkConfig) -> None:
        self.name = name
        self.config = config
        if isinstance(config, MqttSinkConfig):
            self.template = TopicTemplate(config.topic)
            self.wants_envelope = config.envelope
            self.qos, self.retain = config.qos, config.retain
        else:  # HTTP: envelopes, POSTed in JSON arrays
            self.template = TopicTemplate("")
            self.wants_envelope = True
            self.qos, self.retain = 1, False

    def row(
        self, event: Event, *, gateway: str, rule_id: str | None = None, output: Any = None
    ) -> OutboxRow:
        if self.wants_envelope:
            payload = envelope(event, output)
        elif output is not None:
            payload = json_bytes(output)
        else:
            payload = event.raw
        return OutboxRow(
            id=new_row_id(),
            sink=self.name,
            topic=self.template.render(event, gateway=gateway, rule_id=rule_id),
            payload=payload,
            created_at=event.received_at,
            device_id=event.device_id,
            event_id=event.id,
            rule_id=rule_id,
            qos=self.qos,
            retain=self.retain,
            hops=event.hops + 1,
        )


class Sinks:
    """The gateway's sinks; an async context manager that starts and stops their senders."""

    def __init__(
        self,
        *,
        settings: Settings,
        engine: AsyncEngine,
        delete: Callable[[Sequence[str]], None],
        local_protocol: Callable[[], int],
    ) -> None:
        self._gateway = settings.mqtt.client_id
        reader = OutboxReader(engine)
        shared = bool(settings.mqtt.shared_group)
        owner = settings.mqtt.client_id
        self._routes: dict[str, _Route] = {}
        self._sinks: dict[str, Sink] = {
            LOCAL: OrderedSink(
                name=LOCAL,
                config=BaseSinkConfig(),
                transport=MqttTransport(
                    MqttSession(
                        name=LOCAL,
                        config=settings.mqtt,
                        client_id=f"{settings.mqtt.client_id}-pub",
                        protocol=local_protocol,
                        persistent=False,
                    ),
                    window=MQTT_WINDOW,
                    with_event_id=False,
                ),
                reader=reader,
                delete=delete,
                owner=owner,
                shared=shared,
            ),
            WEBHOOKS: WebhookSink.from_config(
                settings.webhooks,
                engine=engine,
                shutdown_timeout_s=settings.shutdown.close_timeout_s,
            ),
        }
        for name, config in settings.sinks.items():
            if not config.enabled:
                continue
            self._routes[name] = _Route(name, config)
            self._sinks[name] = OrderedSink(
                name=name,
                config=config,
                transport=_transport(name, config, gateway=self._gateway),
                reader=reader,
                delete=delete,
                owner=owner,
                shared=shared,
            )
        routed = [
            (name, topic) for name, route in self._routes.items() for topic in route.config.topics
        ]
        #: The route of each filter the matcher holds, by its index.
        self._route_of = [self._routes[name] for name, _ in routed]
        self._matcher = TopicMatcher([topic for _, topic in routed])
        self._routing = bool(routed)
        self._backlogged: set[str] = set()
        self._monitor: asyncio.Task[None] | None = None
        self._started: list[Sink] = []

    @classmethod
    def from_config(
        cls,
        settings: Settings,
        *,
        engine: AsyncEngine,
        delete: Callable[[Sequence[str]], None],
        local_protocol: Callable[[], int],
    ) -> Sinks:
        return cls(settings=settings, engine=engine, delete=delete, local_protocol=local_protocol)

    @property
    def names(self) -> frozenset[str]:
        """Every sink's name (a rule's ``forward`` action must name one of them)."""
        return frozenset(self._sinks)

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._monitor is not None:
            raise RuntimeError("the sinks are already running")
        for name, sink in self._sinks.items():
            await sink.__aenter__()
            self._started.append(sink)
            # Read at each scrape (plain attributes): a snapshot never sees a stale backlog.
            SINK_BACKLOG.labels(sink=name).set_function(functools.partial(_rows, sink))
            SINK_BACKLOG_BYTES.labels(sink=name).set_function(functools.partial(_bytes, sink))
            SINK_ALERT_AFTER.labels(sink=name).set(self._alert_after_s(name))
        DEGRADED.labels(reason="sink_backlog").set(0)
        self._monitor = asyncio.create_task(self._watch(), name="sinks:monitor")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        monitor, self._monitor = self._monitor, None
        await cancel_and_wait(monitor)
        started, self._started = self._started, []
        for sink in reversed(started):
            try:
                await sink.__aexit__(None, None, None)
            except Exception:
                log.exception("sink %s did not stop cleanly", sink.name)

    # -- what the store asks -----------------------------------------------------------------

    def route(self, batch: Sequence[Event]) -> list[OutboxRow]:
        """The rows of the configured sinks whose ``topics`` the batch's events match."""
        if not self._routing:
            return []
        rows: list[OutboxRow] = []
        match, route_of, gateway = self._matcher.match, self._route_of, self._gateway
        for event in batch:
            hits = match(event.topic)
            if not hits:
                continue
            if len(hits) == 1:  # one filter of one sink: the usual case
                rows.append(route_of[hits[0]].row(event, gateway=gateway))
                continue
            for route in dict.fromkeys(route_of[index] for index in hits):
                rows.append(route.row(event, gateway=gateway))
        return rows

    def committed(self, rows: Sequence[OutboxRow]) -> None:
        """Hand committed rows to their sinks, in order."""
        if not rows:
            return
        by_sink: dict[str, list[OutboxRow]] = {}
        for row in rows:
            by_sink.setdefault(row.sink, []).append(row)
        for name, group in by_sink.items():
            sink = self._sinks.get(name)
            if sink is not None:
                sink.committed(group)

    async def wait_for_room(self) -> None:
        """Return once no sink whose backlog is full blocks (``overflow = "block"``)."""
        for sink in self._sinks.values():
            if sink.full:
                await sink.wait_for_room()

    # -- rows of rule actions ----------------------------------------------------------------

    def publish_row(self, match: RuleMatch, action: PublishAction) -> OutboxRow:
        """A rule ``publish`` action's message, for the ``local`` sink."""
        message = publish_message(match, action)
        return OutboxRow(
            id=new_row_id(),
            sink=LOCAL,
            topic=message.topic,
            payload=message.payload,
            created_at=match.event.received_at,
            device_id=match.event.device_id,
            event_id=match.event.id,
            rule_id=match.rule.id,
            qos=message.qos,
            retain=message.retain,
            hops=message.hops,
        )

    def webhook_row(self, match: RuleMatch, action: WebhookAction) -> OutboxRow:
        """A rule ``webhook`` action's POST, for the ``webhooks`` sink."""
        request = webhook_request(match, action)
        return OutboxRow(
            id=new_row_id(),
            sink=WEBHOOKS,
            topic=request.url,
            payload=request.body,
            created_at=match.event.received_at,
            device_id=match.event.device_id,
            event_id=match.event.id,
            rule_id=match.rule.id,
            headers=dict(request.headers),
            timeout_s=request.timeout_s,
        )

    def forward_row(self, match: RuleMatch, sink: str) -> OutboxRow:
        """A rule ``forward`` action's row: the rule's output when it has one, else the event."""
        route = self._routes.get(sink)
        if route is None:
            raise NotFound(f"no sink {sink!r} to forward to", sink=sink, rule_id=match.rule.id)
        return route.row(
            match.event, gateway=self._gateway, rule_id=match.rule.id, output=match.output
        )

    # -- what operators see ------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """Every sink: type, backlog rows and bytes, oldest age, send rate, state, last error."""
        return [self._describe(name, sink) for name, sink in self._sinks.items()]

    def describe_one(self, name: str) -> dict[str, Any]:
        return self._describe(name, self._get(name))

    def _describe(self, name: str, sink: Sink) -> dict[str, Any]:
        route = self._routes.get(name)
        kind = "webhook" if name == WEBHOOKS else "mqtt" if route is None else route.config.type
        return {
            "name": name,
            "type": kind,
            "builtin": route is None,
            "backlog_rows": sink.backlog_rows,
            "backlog_bytes": sink.backlog_bytes,
            "oldest_age_s": round(sink.oldest_age_s(), 3),
            "sent": sink.sent,
            "send_rate": round(sink.send_rate(), 1),
            "max_backlog_bytes": sink.max_bytes,
            "alert_after_s": self._alert_after_s(name),
            "paused": sink.paused,
            "sending": sink.leased,
            "full": sink.full,
            "connected": sink.connected,
            "state": self._state(name, sink),
            "last_error": sink.error,
        }

    def _state(self, name: str, sink: Sink) -> str:
        """One word for the dashboard: paused, full, failing, behind, sending or standby
        (another process holds the sink's lease)."""
        if sink.paused:
            return "paused"
        if sink.full:
            return "full"
        if sink.error:
            return "failing"
        if sink.oldest_age_s() > self._alert_after_s(name):
            return "behind"
        return "sending" if sink.leased else "standby"

    def pause(self, name: str) -> dict[str, Any]:
        self._get(name).pause()
        log.info("sink %s paused", name)
        return self.describe_one(name)

    def resume(self, name: str) -> dict[str, Any]:
        self._get(name).resume()
        log.info("sink %s resumed", name)
        return self.describe_one(name)

    def _get(self, name: str) -> Sink:
        sink = self._sinks.get(name)
        if sink is None:
            raise NotFound(f"no sink {name!r}", sink=name)
        return sink

    def degraded(self) -> dict[str, str]:
        """``sink_backlog`` while a sink's oldest row waits longer than its ``alert_after_s``."""
        late = self._late()
        if not late:
            return {}
        return {
            "sink_backlog": ", ".join(
                f"{name} (oldest {age:.0f}s)" for name, age in sorted(late.items())
            )
        }

    def _late(self) -> dict[str, float]:
        """The sinks whose oldest row is older than their ``alert_after_s``, with its age."""
        ages = {name: sink.oldest_age_s() for name, sink in self._sinks.items()}
        return {name: age for name, age in ages.items() if age > self._alert_after_s(name)}

    async def _watch(self) -> None:
        """Refresh the oldest rows' ages and ``flux_degraded{reason="sink_backlog"}``."""
        gauge = DEGRADED.labels(reason="sink_backlog")
        while True:
            for name, sink in self._sinks.items():
                SINK_OLDEST_AGE.labels(sink=name).set(sink.oldest_age_s())
            late = set(self._late())
            if late != self._backlogged:
                for name in late - self._backlogged:
                    log.warning("sink %s is falling behind: its oldest row waits", name)
                self._backlogged = late
                gauge.set(1 if late else 0)
            await asyncio.sleep(MONITOR_S)

    def _alert_after_s(self, name: str) -> float:
        route = self._routes.get(name)
        return route.config.alert_after_s if route is not None else BaseSinkConfig().alert_after_s


def _rows(sink: Sink) -> float:
    return sink.backlog_rows


def _bytes(sink: Sink) -> float:
    return sink.backlog_bytes


def _transport(name: str, config: MqttSinkConfig | HttpSinkConfig, *, gateway: str) -> Any:
    if isinstance(config, HttpSinkConfig):
        return HttpTransport(config)
    session = MqttSession(
        name=name,
        config=config.broker(gateway),
        client_id=config.client_id or f"{gateway}-{name}",
        protocol=lambda: int(MQTTv50),
        persistent=True,
    )
    return MqttTransport(session, window=MQTT_WINDOW, with_event_id=True)


def check_forward_sinks(rules: Mapping[str, Sequence[str]], sinks: frozenset[str]) -> None:
    """Refuse rules that forward to a sink that does not exist (a configuration error)."""
    for rule_id, targets in rules.items():
        for index, sink in enumerate(targets):
            if sink not in sinks:
                raise ConfigError(
                    f"rule {rule_id!r} forwards to sink {sink!r}, which is not configured "
                    f"(sinks: {sorted(sinks)})",
                    key=f"rules.{rule_id}.forward[{index}].sink",
                )


__all__ = ["LOCAL", "Sink", "Sinks", "check_forward_sinks"]
