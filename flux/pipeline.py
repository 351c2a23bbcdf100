"""The processing stage: plugins, then rules and their actions, over each batch of events.

One bus subscriber (``pipeline``) runs both, so what a stage derives is processed inline,
depth first, up to the hop limit, instead of going back through the bus: a stage that waited
on its own full queue would deadlock. Derived events go to the store only
(``bus.deliver(..., to="store")``), whose handler never delivers, so waiting for room in its
queue is safe. The pipeline does not wait for their commit: it moves on to the next batch
and confirms batches in order as their derived events commit.

Acknowledgement: the bus joins the store's confirmation of an event with the pipeline's,
which comes once everything the event caused is committed: derived events, dead letters,
alert rows, and the outbox rows of its rule publishes, webhooks and forwards (the sinks
deliver those at least once from the outbox). A crash in between means redelivery, so an
alert or a publish is never lost for a message that was acknowledged.

Window rules close on time too: ``WindowTimer`` calls ``Pipeline.close_windows`` every
``WINDOW_TICK_S``, which runs the matches of the windows that closed like a batch's (one
batch or one tick at a time), with nothing to acknowledge.

Every rule action's handler is registered here, on the pipeline's own ``ActionExecutor``;
the actions that send something (``publish``, ``webhook``, ``forward``) become outbox rows
committed with the batch, which the sinks (``flux.sinks``) deliver.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Protocol

from flux.bus import EventBus
from flux.errors import BusClosed
from flux.events import DeadLetter, Event
from flux.metrics import SUBSCRIBER_ERRORS
from flux.plugins import PluginError, PluginManager
from flux.rules import (
    ActionExecutor,
    AlertAction,
    ForwardAction,
    PluginAction,
    PublishAction,
    RuleEngine,
    RuleMatch,
    WebhookAction,
    alert_row,
)
from flux.rules.state import StateRow
from flux.sinks.rows import OutboxRow
from flux.tasks import cancel_and_wait

log = logging.getLogger(__name__)

PIPELINE_SUBSCRIBER = "pipeline"
STORE_SUBSCRIBER = "store"
#: How often the window timer closes the windows that are due (seconds).
WINDOW_TICK_S = 0.25


class AddRows(Protocol):
    """Queue alert, outbox and rule state rows for the store's next transaction
    (``StoreWriter.add_rows``); ``confirm`` runs after their commit."""

    def __call__(
        self,
        *,
        alerts: Sequence[dict[str, Any]] = (),
        outbox: Sequence[OutboxRow] = (),
        state: Sequence[StateRow] = (),
        confirm: Callable[[], None],
    ) -> None: ...


class ActionRows(Protocol):
    """The outbox rows of rule actions that send something (``flux.sinks.Sinks``)."""

    def publish_row(self, match: RuleMatch, action: PublishAction) -> OutboxRow: ...

    def webhook_row(self, match: RuleMatch, action: WebhookAction) -> OutboxRow: ...

    def forward_row(self, match: RuleMatch, sink: str) -> OutboxRow: ...


class _BatchConfirmation:
    """Confirm one batch's events once everything it handed on is confirmed: derived events
    and dead letters committed by the store, publishes PUBACKed by the broker.

    The pipeline goes on with the next batch meanwhile (waiting here would leave the CPU
    idle for each commit's fsync and each broker round trip); ``Pipeline`` confirms batches
    strictly in order.
    """

    __slots__ = ("batch", "outstanding", "sealed")

    def __init__(self, batch: list[Event]) -> None:
        self.batch = batch
        self.outstanding = 0
        self.sealed = False

    @property
    def ready(self) -> bool:
        return self.sealed and self.outstanding == 0


class Pipeline:
    """Run plugins and rules on batches from the bus; persist what they produce."""

    def __init__(
        self,
        *,
        bus: EventBus,
        plugins: PluginManager,
        rules: RuleEngine,
        add_rows: AddRows,
        dead_letter: Callable[[DeadLetter], Awaitable[None]],
        action_rows: ActionRows,
        max_hops: int,
    ) -> None:
        self._bus = bus
        self._plugins = plugins
        self._rules = rules
        self._add_rows = add_rows
        self._dead_letter = dead_letter
        self._action_rows = action_rows
        self._max_hops = max_hops
        # Filled by the action handlers while a batch's matches execute.
        self._alerts: list[dict[str, Any]] = []
        self._outbox: list[OutboxRow] = []
        self._derived: list[Event] = []
        # Batches handled but not yet confirmed, oldest first (see ``handle``); ``_current``
        # is the one being handled.
        self._unconfirmed: deque[_BatchConfirmation] = deque()
        self._current = _BatchConfirmation([])
        # One batch or one window tick at a time: both fill the lists above.
        self._busy = asyncio.Lock()
        self.actions = ActionExecutor(max_hops=max_hops)
        for action_type, handler in (
            ("alert", self._alert_action),
            ("plugin", self._plugin_action),
            ("publish", self._publish_action),
            ("webhook", self._webhook_action),
            ("forward", self._forward_action),
        ):
            self.actions.register(action_type, handler)

    async def handle(self, batch: list[Event]) -> None:
        """Process ``batch`` and what it derives; confirm each event (``event.ack()``, the
        pipeline's part of its acknowledgement) once everything the batch caused is
        confirmed, batches in order.

        A bug in a stage is logged and counted and the batch is still confirmed, so one bad
        batch cannot stall the MQTT receive window; when the bus closes mid-batch (shutdown)
        the batch stays unconfirmed and the broker redelivers it.
        """
        async with self._busy:
            await self._run(batch, [])

    async def close_windows(self) -> None:
        """Close the windows that are due and run the actions of those that match; what the
        actions cause is handled like a batch's (an empty one: nothing to acknowledge)."""
        async with self._busy:
            matches = await self._rules.close_windows()
            if matches:
                await self._run([], matches)

    async def _run(self, batch: list[Event], window_matches: list[RuleMatch]) -> None:
        confirmation = self._current = _BatchConfirmation(batch)
        self._unconfirmed.append(confirmation)
        try:
            work = batch
            matches = window_matches
            while work or matches:
                derived = await self._process(work, matches)
                matches = []
                for event in derived:
                    event.ack = self._part(confirmation)
                    try:
                        await self._bus.deliver(event, to=STORE_SUBSCRIBER)
                    except BaseException:
                        confirmation.outstanding -= 1  # never reached the store
                        raise
                work = [event for event in derived if event.hops <= self._max_hops]
        except BusClosed:
            log.warning("bus closed mid-batch; %d events left for redelivery", len(batch))
            return
        except Exception:
            SUBSCRIBER_ERRORS.labels(subscriber=PIPELINE_SUBSCRIBER).inc()
            log.exception("pipeline failed on a batch of %d events", len(batch))
        confirmation.sealed = True
        self._confirm_ready()

    def _part(self, confirmation: _BatchConfirmation) -> Callable[[], None]:
        """Count one more thing ``confirmation`` waits for; return the callable that
        confirms it (an acknowledgement hook)."""
        confirmation.outstanding += 1
        return partial(self._part_confirmed, confirmation)

    def _part_confirmed(self, confirmation: _BatchConfirmation) -> None:
        confirmation.outstanding -= 1
        if confirmation.ready:
            self._confirm_ready()

    def _confirm_ready(self) -> None:
        """Confirm the oldest batches whose every part is confirmed."""
        unconfirmed = self._unconfirmed
        while unconfirmed and unconfirmed[0].ready:
            for event in unconfirmed.popleft().batch:
                event.ack()

    async def _process(self, work: list[Event], window_matches: list[RuleMatch]) -> list[Event]:
        """One level: plugins on the events they subscribe to, then rules and actions (of the
        windows the timer closed, if any, first)."""
        derived = await self._run_plugins(work)
        matches = await self._rules.evaluate_batch(work)
        if window_matches:
            matches = [*window_matches, *matches]
        if matches:
            await self.actions.execute(matches)
        # Rule state rides with the batch's alerts: the events' acknowledgement waits for it.
        state = self._rules.take_state_changes()
        if matches or state:
            alerts, self._alerts = self._alerts, []
            outbox, self._outbox = self._outbox, []
            derived.extend(self._derived)
            self._derived = []
            if alerts or outbox or state:
                self._add_rows(
                    alerts=alerts, outbox=outbox, state=state, confirm=self._part(self._current)
                )
        return derived

    async def _run_plugins(self, work: list[Event]) -> list[Event]:
        """Each plugin over the events it subscribes to, in one batch call per plugin."""
        by_plugin: dict[str, list[Event]] = {}
        for event in work:
            for name in self._plugins.plugins_for(event.topic):
                by_plugin.setdefault(name, []).append(event)
        derived: list[Event] = []
        for name, events in by_plugin.items():
            outcome = await self._plugins.call_batch(name, events)
            derived.extend(outcome.outputs)
            for event, error in outcome.failed:
                await self._plugin_failed(event, error)
        return derived

    async def _plugin_failed(self, event: Event, error: PluginError) -> None:
        """Keep the event the plugin could not handle as a dead letter with the reason; the
        batch is confirmed only once the dead letter is committed."""
        confirmation = self._current
        letter = DeadLetter(
            topic=event.topic,
            raw=event.raw,
            reason=f"plugin_{error.result}",
            detail=f"{error.fields.get('plugin', '?')}: {error.message}",
            received_at=event.received_at,
            source=event.source,
            ack=self._part(confirmation),
        )
        try:
            await self._dead_letter(letter)
        except BaseException:
            confirmation.outstanding -= 1
            raise

    # -- action handlers (called by ActionExecutor while a batch's matches execute) ---------

    async def _alert_action(self, match: RuleMatch, action: AlertAction) -> None:
        self._alerts.append(alert_row(match, action))

    async def _plugin_action(self, match: RuleMatch, action: PluginAction) -> None:
        self._derived.extend(await self._plugins.call(action.name, match.event))

    async def _publish_action(self, match: RuleMatch, action: PublishAction) -> None:
        self._outbox.append(self._action_rows.publish_row(match, action))

    async def _webhook_action(self, match: RuleMatch, action: WebhookAction) -> None:
        self._outbox.append(self._action_rows.webhook_row(match, action))

    async def _forward_action(self, match: RuleMatch, action: ForwardAction) -> None:
        self._outbox.append(self._action_rows.forward_row(match, action.sink))


class WindowTimer:
    """Close due windows every ``interval_s`` even when no event arrives (a stage of the app).

    A failing tick is logged once and counted; the timer goes on.
    """

    def __init__(self, pipeline: Pipeline, *, interval_s: float = WINDOW_TICK_S) -> None:
        self._pipeline = pipeline
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> WindowTimer:
        if self._task is not None:
            raise RuntimeError("the window timer is already running")
        self._task = asyncio.create_task(self._loop(), name="flux-window-timer")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._pipeline.close_windows()
            except Exception:
                SUBSCRIBER_ERRORS.labels(subscriber="window_timer").inc()
                if not failing:
                    log.exception("closing due windows failed")
                failing = True
            else:
                failing = False


__all__ = [
    "PIPELINE_SUBSCRIBER",
    "STORE_SUBSCRIBER",
    "WINDOW_TICK_S",
    "ActionRows",
    "AddRows",
    "Pipeline",
    "WindowTimer",
]
