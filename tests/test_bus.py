from __future__ import annotations

import asyncio

import pytest

from flux.bus import EventBus
from flux.errors import BusClosed
from flux.events import Event, make_event
from flux.metrics import DEGRADED, EVENTBUS_DROPPED, SUBSCRIBER_ERRORS
from tests.harness import wait_until


def _event(n: int, *, acked: bool = False) -> Event:
    created = make_event("devices/d/t", b'{"n": %d}' % n, max_bytes=1000, source="mqtt")
    assert isinstance(created, Event)
    if acked:
        created.ack = lambda: None
    return created


def _dropped(name: str, reason: str) -> float:
    return EVENTBUS_DROPPED.labels(subscriber=name, reason=reason)._value.get()


def _degraded(reason: str) -> float:
    return DEGRADED.labels(reason=reason)._value.get()


async def test_every_subscriber_sees_every_event_in_order_in_batches() -> None:
    bus = EventBus(capacity=8)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    sizes: list[int] = []

    async def handler_a(batch: list[Event]) -> None:
        sizes.append(len(batch))
        seen["a"].extend(e.payload["n"] for e in batch)

    async def handler_b(batch: list[Event]) -> None:
        seen["b"].extend(e.payload["n"] for e in batch)

    bus.subscribe("a", handler_a, max_batch=4)
    bus.subscribe("b", handler_b)
    async with bus:
        await bus.deliver_many(_event(n) for n in range(100))
        assert await bus.drain(10)
    assert seen["a"] == list(range(100))
    assert seen["b"] == list(range(100))
    assert max(sizes) <= 4


async def test_the_senders_ack_waits_for_every_subscriber_that_takes_the_event() -> None:
    bus = EventBus(capacity=8)
    acked: list[int] = []
    confirm: dict[str, list[Event]] = {"store": [], "pipeline": []}

    async def keep(name: str, batch: list[Event]) -> None:
        confirm[name].extend(batch)

    bus.subscribe("store", lambda batch: keep("store", batch), acknowledges=True)
    bus.subscribe("pipeline", lambda batch: keep("pipeline", batch), acknowledges=True)
    async with bus:
        for n in range(3):
            event = _event(n)
            event.ack = lambda n=n: acked.append(n)  # type: ignore[misc]
            await bus.deliver(event)
        assert await bus.drain(10)
        for event in confirm["store"]:
            event.ack()
        assert acked == [], "acknowledged before the pipeline confirmed"
        for event in reversed(confirm["pipeline"]):
            event.ack()
        assert acked == [2, 1, 0]
        # Delivered to one subscriber only: that subscriber's confirmation is the sender's.
        only = _event(9)
        only.ack = lambda: acked.append(9)
        await bus.deliver(only, to="store")
        assert await bus.drain(10)
        confirm["store"][-1].ack()
        assert acked[-1] == 9


async def test_a_subscriber_that_does_not_acknowledge_is_confirmed_when_its_handler_returns() -> (
    None
):
    bus = EventBus(capacity=8)
    acked: list[int] = []
    kept: list[Event] = []
    release = asyncio.Event()

    async def store(batch: list[Event]) -> None:
        kept.extend(batch)

    async def observer(batch: list[Event]) -> None:
        await release.wait()
        if batch[0].payload["n"] == 1:
            raise RuntimeError("a bug in an observer")

    bus.subscribe("store", store, acknowledges=True)
    bus.subscribe("observer", observer, max_batch=1)
    async with bus:
        for n in range(2):
            event = _event(n)
            event.ack = lambda n=n: acked.append(n)  # type: ignore[misc]
            await bus.deliver(event)
        await wait_until(lambda: len(kept) == 2, what="the store has both")
        for event in kept:
            event.ack()
        assert acked == [], "acknowledged before the observer handled the events"
        release.set()
        assert await bus.drain(10)
    assert acked == [0, 1]  # the failing batch is confirmed too: it must not stall senders


async def test_a_refused_fast_delivery_leaves_the_ack_alone() -> None:
    bus = EventBus(capacity=4)
    bus.subscribe("a", lambda batch: asyncio.sleep(3600))
    bus.subscribe("b", lambda batch: asyncio.sleep(0))
    hook = lambda: None  # noqa: E731
    async with bus:
        delivered = 0
        while bus.try_deliver(_event(delivered)):
            delivered += 1
            assert delivered < 10, "a full queue never refused"
        refused = _event(99)
        refused.ack = hook
        assert not bus.try_deliver(refused)
        assert refused.ack is hook


async def test_block_policy_applies_back_pressure_and_keeps_order() -> None:
    bus = EventBus(capacity=4)
    release = asyncio.Event()
    seen: list[int] = []

    async def slow(batch: list[Event]) -> None:
        await release.wait()
        seen.extend(e.payload["n"] for e in batch)

    bus.subscribe("slow", slow, max_batch=2)
    async with bus:
        publishers = [asyncio.create_task(bus.deliver(_event(n))) for n in range(20)]
        await wait_until(lambda: sum(p.done() for p in publishers) == 6, what="queue full")
        # 2 in the handler, 4 queued, 1 blocked at the queue, 13 waiting their turn behind it.
        assert bus.depth()["slow"] == 5
        assert bus.waiting_senders() == 14
        assert not all(p.done() for p in publishers)
        release.set()
        await asyncio.gather(*publishers)
        assert await bus.drain(10)
    assert seen == list(range(20))


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
async def test_drop_policies_count_drops_and_never_drop_acknowledged_events(policy: str) -> None:
    bus = EventBus(capacity=4, overflow=policy)  # type: ignore[arg-type]
    name = f"drop-{policy}"
    release = asyncio.Event()
    seen: list[int] = []

    async def slow(batch: list[Event]) -> None:
        await release.wait()
        seen.extend(e.payload["n"] for e in batch)

    bus.subscribe(name, slow, max_batch=1)
    before = _dropped(name, policy)
    async with bus:
        await bus.deliver(_event(0))
        await wait_until(lambda: bus.depth()[name] == 0, what="first event in handler")
        for n in range(1, 11):
            await bus.deliver(_event(n))
        assert _dropped(name, policy) - before == 6
        waiting = asyncio.create_task(bus.deliver(_event(99, acked=True)))
        if policy == "drop_newest":
            await wait_until(lambda: bus.depth()[name] == 5, what="acked event waiting")
            assert not waiting.done()
        else:  # it takes the place of the oldest event nobody waits on
            await waiting
            assert _dropped(name, policy) - before == 7
        release.set()
        await waiting
        assert await bus.drain(10)
    expected_kept = [1, 2, 3, 4] if policy == "drop_newest" else [8, 9, 10]
    assert seen == [0, *expected_kept, 99]


@pytest.mark.parametrize(
    ("queued", "arriving", "kept"),
    [
        # Every queued event is waited on: the arriving one, which nobody waits on, goes.
        ("AAAA", "d", "AAAA"),
        # The oldest event nobody waits on goes, wherever it is in the queue.
        ("dAAA", "d", "AAAd"),
        ("AdAd", "A", "AAdA"),
        ("AAdA", "d", "AAAd"),
    ],
)
async def test_drop_oldest_never_drops_an_event_someone_waits_on(
    queued: str, arriving: str, kept: str
) -> None:
    """``A`` is an event a sender waits on (QoS 1, HTTP), ``d`` one nobody waits on."""
    bus = EventBus(capacity=4, overflow="drop_oldest")
    release = asyncio.Event()
    seen: list[str] = []

    async def slow(batch: list[Event]) -> None:
        await release.wait()
        seen.extend(e.payload["kind"] for e in batch)

    def event(kind: str) -> Event:
        created = make_event(
            "devices/d/t", b'{"kind": "%s"}' % kind.encode(), max_bytes=100, source="mqtt"
        )
        assert isinstance(created, Event)
        if kind == "A":
            created.ack = lambda: None
        return created

    bus.subscribe("oldest", slow, max_batch=1)
    async with bus:
        await bus.deliver(event("first"))
        await wait_until(lambda: bus.depth()["oldest"] == 0, what="first event in the handler")
        for kind in queued:
            await bus.deliver(event(kind))
        await asyncio.wait_for(bus.deliver(event(arriving)), 5)  # never waits here
        release.set()
        assert await bus.drain(10)
    assert seen == ["first", *kept]


async def test_a_failing_subscriber_is_counted_and_does_not_break_the_bus() -> None:
    bus = EventBus(capacity=16)
    good: list[int] = []

    async def broken(batch: list[Event]) -> None:
        raise RuntimeError("subscriber bug")

    async def fine(batch: list[Event]) -> None:
        good.extend(e.payload["n"] for e in batch)

    bus.subscribe("broken", broken, max_batch=1)
    bus.subscribe("fine", fine)
    before = SUBSCRIBER_ERRORS.labels(subscriber="broken")._value.get()
    async with bus:
        await bus.deliver_many(_event(n) for n in range(5))
        assert await bus.drain(10)
    assert good == list(range(5))
    assert SUBSCRIBER_ERRORS.labels(subscriber="broken")._value.get() - before == 5


async def test_a_partial_batch_waits_at_most_max_wait() -> None:
    bus = EventBus(capacity=100)
    batches: list[int] = []

    async def handler(batch: list[Event]) -> None:
        batches.append(len(batch))

    bus.subscribe("store", handler, max_batch=50, max_wait_s=0.05)
    async with bus:
        await bus.deliver_many(_event(n) for n in range(3))
        await wait_until(lambda: sum(batches) == 3, timeout=5, what="partial batch")
    assert batches == [3]


async def test_unsubscribe_and_close() -> None:
    bus = EventBus(capacity=4)
    seen: list[int] = []

    async def handler(batch: list[Event]) -> None:
        seen.extend(e.payload["n"] for e in batch)

    unsubscribe = bus.subscribe("h", handler)
    async with bus:
        assert bus.subscriber_count() == 1
        unsubscribe()
        assert bus.subscriber_count() == 0
        await bus.deliver(_event(1))
        bus.close()
        with pytest.raises(BusClosed):
            await bus.deliver(_event(2))
    assert seen == []
    with pytest.raises(ValueError, match="already exists"):
        bus.subscribe("x", handler)
        bus.subscribe("x", handler)


async def test_backlog_is_reported_above_the_high_water_mark_and_cleared_below_the_low() -> None:
    bus = EventBus(capacity=10)  # high water 80%: more than 8 queued; low water: below 5
    release = asyncio.Event()
    handled: list[int] = []

    async def slow(batch: list[Event]) -> None:
        await release.wait()
        release.clear()
        handled.extend(e.payload["n"] for e in batch)

    bus.subscribe("slow", slow, max_batch=2)
    async with bus:
        await bus.deliver(_event(0))
        await wait_until(lambda: bus.depth()["slow"] == 0, what="first event in the handler")
        for n in range(1, 9):
            await bus.deliver(_event(n))
        assert bus.depth()["slow"] == 8  # at the mark, not above it
        assert bus.degraded() == {}
        assert _degraded("bus_backlog") == 0
        await bus.deliver(_event(9))
        assert "bus_backlog" in bus.degraded()
        assert bus.degraded()["bus_backlog"] == "slow (9 of 10 queued)"
        assert _degraded("bus_backlog") == 1
        # 9 -> 7 -> 5 queued: still above the low-water mark, still backing up.
        for handled_count in (1, 3):
            release.set()
            await wait_until(lambda n=handled_count: len(handled) == n, what="a batch handled")
            assert "bus_backlog" in bus.degraded()
        release.set()  # 5 -> 3 queued: below half, caught up
        await wait_until(lambda: len(handled) == 5, what="a batch handled")
        await wait_until(lambda: bus.depth()["slow"] == 3, what="the next batch taken")
        assert bus.degraded() == {}
        assert _degraded("bus_backlog") == 0
        while len(handled) < 10:
            release.set()
            await asyncio.sleep(0)
        assert await bus.drain(10)
    assert handled == list(range(10))


async def test_a_blocked_subscriber_reports_backlog_until_the_bus_stops() -> None:
    bus = EventBus(capacity=4)
    stuck = asyncio.Event()

    async def handler(batch: list[Event]) -> None:
        await stuck.wait()

    bus.subscribe("stuck", handler, max_batch=1)
    async with bus:
        publishers = [asyncio.create_task(bus.deliver(_event(n))) for n in range(8)]
        await wait_until(lambda: "bus_backlog" in bus.degraded(), what="backlog reported")
        assert _degraded("bus_backlog") == 1
        for publisher in publishers:
            publisher.cancel()
        await asyncio.gather(*publishers, return_exceptions=True)
    assert bus.degraded() == {}
    assert _degraded("bus_backlog") == 0


async def test_dropping_is_reported_while_drops_happen_and_clears_after_the_window() -> None:
    bus = EventBus(capacity=2, overflow="drop_newest", dropping_window_s=0.2)
    release = asyncio.Event()

    async def slow(batch: list[Event]) -> None:
        await release.wait()

    bus.subscribe("dropper", slow, max_batch=1)
    before = _dropped("dropper", "drop_newest")
    async with bus:
        await bus.deliver(_event(0))
        await wait_until(lambda: bus.depth()["dropper"] == 0, what="first event in the handler")
        for n in range(1, 6):
            await bus.deliver(_event(n))
        assert _dropped("dropper", "drop_newest") - before == 3
        reasons = bus.degraded()
        assert reasons.get("dropping") == "dropper (3 dropped)", reasons
        assert _degraded("dropping") == 1
        release.set()
        # No more drops: the reason clears once the window has passed since the last one.
        await wait_until(lambda: "dropping" not in bus.degraded(), timeout=5, what="cleared")
        assert _degraded("dropping") == 0
        assert await bus.drain(10)


async def test_below_the_high_water_mark_nothing_is_reported() -> None:
    bus = EventBus(capacity=100, overflow="drop_oldest")
    seen: list[int] = []

    async def handler(batch: list[Event]) -> None:
        seen.extend(e.payload["n"] for e in batch)

    bus.subscribe("fast", handler)
    async with bus:
        for n in range(1000):
            await bus.deliver(_event(n))
            if n % 50 == 0:
                await asyncio.sleep(0)  # let the subscriber keep up
        assert await bus.drain(10)
        assert bus.degraded() == {}
    assert seen == list(range(1000))


def test_water_marks_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="low_water"):
        EventBus(capacity=10, high_water=0.5, low_water=0.8)
