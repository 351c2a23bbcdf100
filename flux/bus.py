"""The in-process event bus: bounded per-subscriber queues delivering ordered batches.

Ingest hands every event over with ``deliver``; each subscriber that takes it gets it in its
own queue, and the bus joins their confirmations: the sender's acknowledgement (a PUBACK,
an HTTP answer) runs only once every one of them has confirmed the event. A subscriber that
``acknowledges`` calls ``event.ack()`` itself when it is done (the store after commit, the
pipeline once what the event caused is committed); for any other the bus confirms each
batch when its handler returns.

Each subscriber owns a queue of at most ``capacity`` events and a task that hands it
batches. When a queue is full the subscriber's overflow policy decides: ``block`` makes
the sender wait (back-pressure reaches the MQTT socket through Receive Maximum and the
HTTP caller), ``drop_oldest`` / ``drop_newest`` drop and count. Events a sender waits on
(MQTT QoS 1, HTTP) are never dropped, whether queued or arriving: ``drop_oldest`` evicts
the oldest queued event nobody waits on (and the arriving one takes its place, whatever it
is), else drops the arriving one if nobody waits on it; an arriving event someone waits on
that finds nothing to evict waits as under ``block``.
Blocked senders are served strictly first-come first-served, and a sender that has to
wait holds the bus's ordering lock until it has reached every subscriber, so no later
event overtakes it anywhere: each subscriber sees events in delivery order.

The bus reports two ``flux_degraded`` reasons, changed on state transitions only (the
delivery fast path does no extra work): ``bus_backlog`` while some subscriber's queue
holds more than ``high_water`` of its capacity (cleared once it is below ``low_water``),
and ``dropping`` while a drop policy dropped an event within the last ``dropping_window_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Self

from prometheus_client import Counter

from flux.config import EventBusConfig, OverflowPolicy
from flux.errors import BusClosed
from flux.events import Event
from flux.metrics import (
    DEGRADED,
    EVENTBUS_BLOCKED,
    EVENTBUS_CAPACITY,
    EVENTBUS_DEPTH,
    EVENTBUS_DROPPED,
    EVENTS_PUBLISHED,
    SUBSCRIBER_ERRORS,
)
from flux.tasks import cancel_and_wait

log = logging.getLogger(__name__)

BatchHandler = Callable[[list[Event]], Awaitable[None]]
EventFilter = Callable[[Event], bool]


class JointAck:
    """Call ``ack`` once every one of ``parts`` confirmations has arrived."""

    __slots__ = ("_ack", "_remaining")

    def __init__(self, ack: Callable[[], None], parts: int) -> None:
        self._ack = ack
        self._remaining = parts

    def __call__(self) -> None:
        self._remaining -= 1
        if self._remaining == 0:
            self._ack()


class _Health:
    """The bus's degraded reasons, ``bus_backlog`` and ``dropping``, and their gauges.

    Called on transitions only: a subscriber crossing its high- or low-water mark, and a
    drop (already the slow path). ``dropping`` clears by a timer ``window_s`` after the last
    drop, so a steady stream of drops costs one timer per window, not work per event.
    """

    def __init__(self, *, window_s: float) -> None:
        self.window_s = window_s
        self.backlogged: dict[str, _Subscription] = {}
        self.drops: dict[str, int] = {}  # subscriber -> drops since ``dropping`` was set
        self.last_drop = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._backlog_gauge = DEGRADED.labels(reason="bus_backlog")
        self._dropping_gauge = DEGRADED.labels(reason="dropping")

    def set_backlog(self, subscription: _Subscription, backlogged: bool) -> None:
        name, depth = subscription.name, len(subscription.queue)
        if backlogged:
            if not self.backlogged:
                self._backlog_gauge.set(1)
            self.backlogged[name] = subscription
            log.warning(
                "subscriber %s is backing up: %d of %d queued", name, depth, subscription.capacity
            )
        elif self.backlogged.pop(name, None) is not None:
            if not self.backlogged:
                self._backlog_gauge.set(0)
            log.info("subscriber %s caught up: %d of %d queued", name, depth, subscription.capacity)

    def dropped(self, name: str) -> None:
        self.last_drop = time.monotonic()
        self.drops[name] = self.drops.get(name, 0) + 1
        if self._timer is None:
            self._dropping_gauge.set(1)
            log.warning("subscriber %s is dropping events (overflow policy)", name)
            self._timer = asyncio.get_running_loop().call_later(self.window_s, self._expire)

    def _expire(self) -> None:
        remaining = self.last_drop + self.window_s - time.monotonic()
        if remaining > 0:
            self._timer = asyncio.get_running_loop().call_later(remaining, self._expire)
            return
        self._timer = None
        log.info("no drops for %.0fs; dropped since it began: %s", self.window_s, self.drops)
        self.drops = {}
        self._dropping_gauge.set(0)

    def reasons(self) -> dict[str, str]:
        reasons: dict[str, str] = {}
        if self.backlogged:
            reasons["bus_backlog"] = ", ".join(
                f"{name} ({len(sub.queue)} of {sub.capacity} queued)"
                for name, sub in sorted(self.backlogged.items())
            )
        if self._timer is not None:
            reasons["dropping"] = ", ".join(
                f"{name} ({count} dropped)" for name, count in sorted(self.drops.items())
            )
        return reasons

    def reset(self) -> None:
        """Clear both reasons (the bus starts or stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.backlogged.clear()
        self.drops = {}
        self._backlog_gauge.set(0)
        self._dropping_gauge.set(0)


class _Subscription:
    """One subscriber: its queue, its blocked senders and the task that feeds it."""

    def __init__(
        self,
        *,
        name: str,
        handler: BatchHandler,
        capacity: int,
        overflow: OverflowPolicy,
        max_batch: int,
        max_wait_s: float,
        accepts: EventFilter | None,
        acknowledges: bool,
        health: _Health,
        high_water: float,
        low_water: float,
    ) -> None:
        self.name = name
        self.handler = handler
        self.capacity = capacity
        self.overflow = overflow
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.accepts = accepts
        self.acknowledges = acknowledges
        self.queue: deque[Event] = deque()
        self.blocked: deque[tuple[Event, asyncio.Future[None]]] = deque()
        self.wakeup = asyncio.Event()
        # True while a partly filled batch waits up to ``max_wait_s``: only a full batch
        # needs to wake the task then, not every event.
        self.collecting = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.task: asyncio.Task[None] | None = None
        # Read at scrape time, so it shows a queue filling while its handler is busy.
        EVENTBUS_DEPTH.labels(subscriber=name).set_function(lambda: len(self.queue))
        EVENTBUS_CAPACITY.labels(subscriber=name).set(capacity)
        self.dropped: Counter | None = None  # created on the first drop
        self.blocked_count = EVENTBUS_BLOCKED.labels(subscriber=name)
        self.health = health
        # Backing up: more than ``high_mark`` queued; caught up: fewer than ``low_mark``.
        self.high_mark = min(capacity - 1, math.floor(capacity * high_water))
        self.low_mark = max(1, math.ceil(capacity * low_water))
        self.backlogged = False
        # The fast path's limit: the high-water mark until the backlog is reported, then
        # the capacity, so the fast path costs the same in both states.
        self.room = self.high_mark

    def wake(self) -> None:
        """Tell the task events arrived (while collecting: only once the batch is full)."""
        if not self.collecting or len(self.queue) >= self.max_batch:
            self.wakeup.set()

    def has_room(self) -> bool:
        """True when ``append`` may queue an event now (below the fast-path limit, no waiters)."""
        return len(self.queue) < self.room and not self.blocked

    def append(self, event: Event) -> None:
        """Queue ``event``; only after ``has_room`` said so."""
        self.queue.append(event)
        self.wake()

    async def offer(self, event: Event) -> None:
        """Queue ``event`` according to the overflow policy; wait when it must block."""
        if len(self.queue) < self.room and not self.blocked:
            self.queue.append(event)
            self.wake()
            return
        if not self.backlogged:
            self.set_backlogged(True)
        if len(self.queue) < self.capacity and not self.blocked:
            self.queue.append(event)
            self.wake()
            return
        if self.overflow == "drop_oldest" and not self.blocked and self._evict_oldest():
            self.queue.append(event)
            self.wake()
            return
        if self.overflow != "block" and not event.needs_ack:
            self._drop()  # drop_newest, or nothing queued may go (all waited on, or waiters)
            return
        self.blocked_count.inc()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.blocked.append((event, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.done() or waiter.cancelled():
                with contextlib.suppress(ValueError):
                    self.blocked.remove((event, waiter))
            raise

    def set_backlogged(self, backlogged: bool) -> None:
        """Report crossing the high-water mark (True) or falling below the low one."""
        self.backlogged = backlogged
        self.room = self.capacity if backlogged else self.high_mark
        self.health.set_backlog(self, backlogged)

    def _evict_oldest(self) -> bool:
        """Drop the oldest queued event nobody waits on (drop_oldest); False if there is none."""
        for position, queued in enumerate(self.queue):
            if not queued.needs_ack:
                del self.queue[position]
                self._drop()
                return True
        return False

    def _drop(self) -> None:
        """Count one event dropped by the overflow policy and report ``dropping``."""
        if self.dropped is None:
            self.dropped = EVENTBUS_DROPPED.labels(subscriber=self.name, reason=self.overflow)
        self.dropped.inc()
        self.health.dropped(self.name)

    def _admit_blocked(self) -> None:
        """Move blocked senders' events into the queue, oldest first, while there is room."""
        while self.blocked and len(self.queue) < self.capacity:
            event, waiter = self.blocked.popleft()
            self.queue.append(event)
            if not waiter.done():
                waiter.set_result(None)

    def take_batch(self) -> list[Event]:
        count = min(self.max_batch, len(self.queue))
        queue = self.queue
        batch = [queue.popleft() for _ in range(count)]
        self._admit_blocked()
        return batch

    def pending(self) -> int:
        return len(self.queue) + len(self.blocked)

    async def run(self) -> None:
        """Deliver batches until cancelled; a failing handler is logged, counted and skipped."""
        while True:
            while not self.queue:
                self.idle.set()
                self.wakeup.clear()
                await self.wakeup.wait()
            self.idle.clear()
            if self.max_wait_s > 0 and len(self.queue) < self.max_batch:
                self.collecting = True
                self.wakeup.clear()
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wakeup.wait(), self.max_wait_s)
                finally:
                    self.collecting = False
            batch = self.take_batch()
            if self.backlogged and len(self.queue) < self.low_mark:
                self.set_backlogged(False)
            try:
                await self.handler(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                SUBSCRIBER_ERRORS.labels(subscriber=self.name).inc()
                log.exception("subscriber %s failed on a batch of %d events", self.name, len(batch))
            if not self.acknowledges:
                # Confirmed as handled, failed or not: one bad batch must not hold the
                # senders' acknowledgements (and the MQTT receive window) forever.
                for event in batch:
                    event.ack()


class EventBus:
    """Deliver events to subscribers inside the process: bounded, ordered, batched."""

    def __init__(
        self,
        *,
        capacity: int,
        overflow: OverflowPolicy = "block",
        high_water: float = 0.8,
        low_water: float = 0.5,
        dropping_window_s: float = 30.0,
    ) -> None:
        if not 0 < low_water <= high_water <= 1:
            raise ValueError("need 0 < low_water <= high_water <= 1")
        self._capacity = capacity
        self._overflow = overflow
        self._high_water = high_water
        self._low_water = low_water
        self._health = _Health(window_s=dropping_window_s)
        self._subscriptions: list[_Subscription] = []
        # Held by a sender that had to wait for a full queue; later senders queue on it.
        self._ordered = asyncio.Lock()
        self._slow_senders = 0  # senders holding or waiting for ``_ordered``
        # Resolved once: looking a labelled child up costs more than the increment itself.
        self._delivered = {
            source: EVENTS_PUBLISHED.labels(source=source) for source in ("mqtt", "http", "derived")
        }
        self._running = False
        self._closed = False

    @classmethod
    def from_config(cls, config: EventBusConfig) -> EventBus:
        """A bus with the configured capacity and default overflow policy."""
        return cls(capacity=config.capacity, overflow=config.overflow)

    @property
    def capacity(self) -> int:
        return self._capacity

    def subscribe(
        self,
        name: str,
        handler: BatchHandler,
        *,
        overflow: OverflowPolicy | None = None,
        max_batch: int = 256,
        max_wait_s: float = 0.0,
        accepts: EventFilter | None = None,
        acknowledges: bool = False,
    ) -> Callable[[], None]:
        """Register ``handler`` for batches of events; return a callable that unsubscribes.

        ``max_wait_s`` lets a batch wait that long for ``max_batch`` events before it goes
        out partly filled (the store's flush interval); ``accepts`` filters events.
        ``acknowledges``: the handler calls ``event.ack()`` itself once it is done with each
        event (the store after commit); otherwise the bus confirms the batch for it when the
        handler returns. Either way the sender's acknowledgement waits for every subscriber.
        """
        if any(sub.name == name for sub in self._subscriptions):
            raise ValueError(f"a subscriber named {name!r} already exists")
        subscription = _Subscription(
            name=name,
            handler=handler,
            capacity=self._capacity,
            overflow=overflow or self._overflow,
            max_batch=max_batch,
            max_wait_s=max_wait_s,
            accepts=accepts,
            acknowledges=acknowledges,
            health=self._health,
            high_water=self._high_water,
            low_water=self._low_water,
        )
        self._subscriptions.append(subscription)
        if self._running:
            subscription.task = asyncio.create_task(subscription.run(), name=f"bus:{name}")

        def unsubscribe() -> None:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)
                if subscription.backlogged:
                    subscription.set_backlogged(False)
                if subscription.task is not None:
                    subscription.task.cancel()

        return unsubscribe

    def try_deliver(self, event: Event) -> bool:
        """Deliver ``event`` now if every subscriber that takes it has room; else do nothing.

        The synchronous fast path for ingest, which calls it per message without a task:
        False means "use ``deliver``", never that the event was dropped. It also refuses while
        an earlier sender waits for room, so a later event cannot overtake it.
        """
        if self._closed:
            raise BusClosed("the event bus is closed")
        if self._slow_senders:
            return False
        targets = self._targets(event)
        for subscription in targets:
            if not subscription.has_room():
                return False
        self._join_acks(event, targets)
        self._delivered[event.source].inc()
        for subscription in targets:
            subscription.append(event)
        return True

    async def deliver(self, event: Event, *, to: str | None = None) -> None:
        """Offer ``event`` to every subscriber that takes it, waiting where a queue blocks.

        ``to`` restricts delivery to one subscriber: a stage handing on what it derived uses
        it so an event never comes back to the stage that is waiting on it.
        """
        if to is None and self.try_deliver(event):
            return
        if self._closed:
            raise BusClosed("the event bus is closed")
        targets = self._targets(event, to)
        self._join_acks(event, targets)
        self._delivered[event.source].inc()
        if to is not None:
            for subscription in targets:
                await subscription.offer(event)
            return
        # Some queue is full, or an earlier event is still on this path: deliver under the
        # lock (FIFO), so no later event overtakes this one at a subscriber after the one it
        # waits for (a full queue admits events in order, but the sender only moves on to
        # the next subscriber when its task next runs).
        self._slow_senders += 1
        try:
            async with self._ordered:
                for subscription in targets:
                    await subscription.offer(event)
        finally:
            self._slow_senders -= 1

    async def deliver_many(self, events: Iterable[Event]) -> None:
        """Deliver several events in order."""
        for event in events:
            await self.deliver(event)

    def _targets(self, event: Event, to: str | None = None) -> list[_Subscription]:
        """The subscribers that take ``event`` (only the one named ``to``, if given)."""
        return [
            sub
            for sub in self._subscriptions
            if (to is None or sub.name == to) and (sub.accepts is None or sub.accepts(event))
        ]

    @staticmethod
    def _join_acks(event: Event, targets: list[_Subscription]) -> None:
        """Make the sender's acknowledgement wait for every subscriber that takes ``event``.

        Each subscriber calls ``event.ack()`` once it is done with the event (the store after
        commit, the pipeline once everything the event caused is committed); the sender's
        own hook runs after the last of them.
        """
        if event.needs_ack and len(targets) > 1:
            event.ack = JointAck(event.ack, len(targets))

    def depth(self) -> dict[str, int]:
        """Return the number of events waiting per subscriber (queued plus blocked)."""
        return {sub.name: sub.pending() for sub in self._subscriptions}

    def overflow_policies(self) -> dict[str, OverflowPolicy]:
        """Return each subscriber's overflow policy."""
        return {sub.name: sub.overflow for sub in self._subscriptions}

    def waiting_senders(self) -> int:
        """Return how many senders wait because some queue is full."""
        return self._slow_senders

    def degraded(self) -> dict[str, str]:
        """Return the bus's degraded reasons (``bus_backlog``, ``dropping``) with details."""
        return self._health.reasons()

    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    async def drain(self, timeout: float) -> bool:
        """Wait until every queue is empty and every handler idle; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            busy = [sub for sub in self._subscriptions if sub.pending() or not sub.idle.is_set()]
            if not busy:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(busy[0].idle.wait(), remaining)
            if busy[0].pending() and busy[0].idle.is_set():
                # Items arrived after it went idle; its task will pick them up shortly.
                await asyncio.sleep(0)

    def close(self) -> None:
        """Refuse new events; what is queued is still delivered until the bus exits."""
        self._closed = True

    async def __aenter__(self) -> Self:
        if self._running:
            raise RuntimeError("the event bus is already running")
        self._running = True
        self._health.reset()
        for subscription in self._subscriptions:
            subscription.task = asyncio.create_task(
                subscription.run(), name=f"bus:{subscription.name}"
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closed = True
        self._running = False
        await cancel_and_wait(*(sub.task for sub in self._subscriptions))
        for subscription in self._subscriptions:
            subscription.task = None
            for _, waiter in subscription.blocked:
                if not waiter.done():
                    waiter.set_exception(BusClosed("the event bus stopped"))
            subscription.blocked.clear()
            if subscription.backlogged:
                subscription.set_backlogged(False)
        self._health.reset()


__all__ = ["BatchHandler", "EventBus", "JointAck"]
