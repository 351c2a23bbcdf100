"""The in-process event bus: bounded per-subscriber queues delivering ordered batches.

Each subscriber owns a queue of at most ``capacity`` events and a task that hands it
batches. When a queue is full the subscriber's overflow policy decides: ``block`` makes
the publisher wait (back-pressure reaches the MQTT socket through Receive Maximum and the
HTTP caller), ``drop_oldest`` / ``drop_newest`` drop and count. Events a sender waits on
(MQTT QoS 1, HTTP) are never dropped: under a drop policy they wait as under ``block``.
Blocked publishers are served strictly first-come first-served, so order is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Self

from flux.config import OverflowPolicy
from flux.errors import FluxError
from flux.events import Event
from flux.metrics import EVENTBUS_DEPTH, EVENTBUS_DROPPED, EVENTS_PUBLISHED, SUBSCRIBER_ERRORS

log = logging.getLogger(__name__)

BatchHandler = Callable[[list[Event]], Awaitable[None]]
EventFilter = Callable[[Event], bool]


class BusClosed(FluxError):
    """The bus is stopping or stopped and takes no more events."""

    status_code = 503


class _Subscription:
    """One subscriber: its queue, its blocked publishers and the task that feeds it."""

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
    ) -> None:
        self.name = name
        self.handler = handler
        self.capacity = capacity
        self.overflow = overflow
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.accepts = accepts
        self.queue: deque[Event] = deque()
        self.blocked: deque[tuple[Event, asyncio.Future[None]]] = deque()
        self.wakeup = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.task: asyncio.Task[None] | None = None
        self.depth_gauge = EVENTBUS_DEPTH.labels(subscriber=name)

    async def offer(self, event: Event) -> None:
        """Queue ``event`` according to the overflow policy; wait when it must block."""
        if len(self.queue) < self.capacity and not self.blocked:
            self.queue.append(event)
            self.wakeup.set()
            return
        if self.overflow != "block" and not event.needs_ack:
            if self.overflow == "drop_newest":
                EVENTBUS_DROPPED.labels(subscriber=self.name, reason="drop_newest").inc()
                return
            if self.queue:
                self.queue.popleft()
                EVENTBUS_DROPPED.labels(subscriber=self.name, reason="drop_oldest").inc()
                self.queue.append(event)
                self.wakeup.set()
                return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.blocked.append((event, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.done() or waiter.cancelled():
                with contextlib.suppress(ValueError):
                    self.blocked.remove((event, waiter))
            raise

    def _admit_blocked(self) -> None:
        """Move blocked publishers' events into the queue, oldest first, while there is room."""
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
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.idle.set()
                self.wakeup.clear()
                await self.wakeup.wait()
            self.idle.clear()
            if self.max_wait_s > 0 and len(self.queue) < self.max_batch:
                deadline = loop.time() + self.max_wait_s
                while len(self.queue) < self.max_batch:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self.wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wakeup.wait(), remaining)
            batch = self.take_batch()
            self.depth_gauge.set(len(self.queue))
            try:
                await self.handler(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                SUBSCRIBER_ERRORS.labels(subscriber=self.name).inc()
                log.exception("subscriber %s failed on a batch of %d events", self.name, len(batch))


class EventBus:
    """Publish/subscribe inside the process with bounded, ordered, batched delivery."""

    def __init__(self, *, capacity: int, overflow: OverflowPolicy = "block") -> None:
        self._capacity = capacity
        self._overflow = overflow
        self._subscriptions: list[_Subscription] = []
        # Resolved once: looking a labelled child up costs more than the increment itself.
        self._published = {
            source: EVENTS_PUBLISHED.labels(source=source) for source in ("mqtt", "http", "derived")
        }
        self._running = False
        self._closed = False

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
    ) -> Callable[[], None]:
        """Register ``handler`` for batches of events; return a callable that unsubscribes.

        ``max_wait_s`` lets a batch wait that long for ``max_batch`` events before it goes
        out partly filled (the store's flush interval); ``accepts`` filters events.
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
        )
        self._subscriptions.append(subscription)
        if self._running:
            subscription.task = asyncio.create_task(subscription.run(), name=f"bus:{name}")

        def unsubscribe() -> None:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)
                if subscription.task is not None:
                    subscription.task.cancel()

        return unsubscribe

    async def publish(self, event: Event, *, to: str | None = None) -> None:
        """Offer ``event`` to every subscriber that accepts it, waiting where a queue blocks.

        ``to`` restricts delivery to one subscriber: a stage re-publishing what it derived
        uses it so an event never comes back to the stage that is waiting on it.
        """
        if self._closed:
            raise BusClosed("the event bus is closed")
        self._published[event.source].inc()
        for subscription in self._subscriptions:
            if to is not None and subscription.name != to:
                continue
            if subscription.accepts is None or subscription.accepts(event):
                await subscription.offer(event)

    def accepted_by(self, name: str, event: Event) -> bool:
        """Return whether subscriber ``name`` exists and would receive ``event``."""
        for subscription in self._subscriptions:
            if subscription.name == name:
                return subscription.accepts is None or subscription.accepts(event)
        return False

    async def publish_many(self, events: Iterable[Event]) -> None:
        """Publish several events in order."""
        for event in events:
            await self.publish(event)

    def depth(self) -> dict[str, int]:
        """Return the number of events waiting per subscriber (queued plus blocked)."""
        return {sub.name: sub.pending() for sub in self._subscriptions}

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
        """Refuse new events; what is queued still gets delivered until ``stop``."""
        self._closed = True

    async def __aenter__(self) -> Self:
        if self._running:
            raise RuntimeError("the event bus is already running")
        self._running = True
        for subscription in self._subscriptions:
            subscription.task = asyncio.create_task(
                subscription.run(), name=f"bus:{subscription.name}"
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closed = True
        self._running = False
        tasks = [sub.task for sub in self._subscriptions if sub.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for subscription in self._subscriptions:
            subscription.task = None
            for _, waiter in subscription.blocked:
                if not waiter.done():
                    waiter.set_exception(BusClosed("the event bus stopped"))
            subscription.blocked.clear()


__all__ = ["BatchHandler", "BusClosed", "EventBus"]
