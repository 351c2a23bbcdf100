"""Scenario 4: a subscriber slowed far below the publishing rate.

A ``slow`` subscriber on the running gateway's bus takes batches of 10 and needs 20 ms for
each (500 events/s); the device publishes as fast as paho can (over 10x that). Pass: no
subscriber queue ever holds more than ``capacity`` events; with QoS 1 and ``block`` nothing
is lost (the store and the slow subscriber each see every message, in order); with QoS 0
under ``drop_oldest`` / ``drop_newest`` the slow subscriber's drops are counted under that
reason and account exactly for what it did not see, while the store (``block``) keeps all.
Event-loop lag (p99 of a 5 ms timer's overshoot) is measured and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from pathlib import Path
from typing import Any

import pytest

from flux.app import Gateway
from flux.events import Event
from flux.metrics import EVENTBUS_DROPPED
from tests.harness import (
    Db,
    PrivateMosquitto,
    SeqDevice,
    make_settings,
    unique,
    wait_subscribed,
    wait_until,
)

CAPACITY = 64
SLOW_BATCH = 10
SLOW_DELAY_S = 0.02


class _Probe:
    """Sample every subscriber's queue and the event loop's timer lag while it runs."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.peak_queue = 0
        self.lags: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def sample_queues(self) -> None:
        for sub in self.gateway.bus._subscriptions:
            self.peak_queue = max(self.peak_queue, len(sub.queue))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            self.sample_queues()
            started = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.005)
            self.lags.append(max(0.0, loop.time() - started - 0.005))

    async def __aenter__(self) -> _Probe:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    def lag_p99_ms(self) -> float:
        if len(self.lags) < 2:
            return 0.0
        return statistics.quantiles(self.lags, n=100)[98] * 1000


def _slow_subscriber(gateway: Gateway, topic: str, policy: Any, probe: _Probe) -> Any:
    seen: list[int] = []

    async def handler(batch: list[Event]) -> None:
        probe.sample_queues()
        seen.extend(event.payload["seq"] for event in batch)
        await asyncio.sleep(SLOW_DELAY_S)  # the slowness under test, not synchronisation

    unsubscribe = gateway.bus.subscribe(
        "slow",
        handler,
        overflow=policy,
        max_batch=SLOW_BATCH,
        accepts=lambda event: event.topic == topic,
    )
    return seen, unsubscribe


@pytest.mark.slow
async def test_slow_subscriber_blocks_qos1_without_loss(
    tmp_path: Path, mosquitto: PrivateMosquitto, start_gateway: Any
) -> None:
    dev = unique("dev")
    topic = f"devices/{dev}/telemetry"
    sent = 1500
    settings = make_settings(
        tmp_path,
        ("127.0.0.1", mosquitto.port),
        device_ids=[dev],
        eventbus={"capacity": CAPACITY, "overflow": "block"},
        database={"batch_size": 50},
    )
    db = Db(settings.database.url)
    sim = SeqDevice("127.0.0.1", mosquitto.port)
    try:
        async with start_gateway(settings) as gateway, _Probe(gateway) as probe:
            seen, unsubscribe = _slow_subscriber(gateway, topic, "block", probe)
            await wait_subscribed(sim, db, dev)
            await asyncio.to_thread(sim.publish_seq, topic, range(sent))
            await wait_until(lambda: db.has_all(topic, sent), timeout=90, what="all stored")
            await wait_until(lambda: len(seen) >= sent, timeout=60, what="slow sub saw all")
            unsubscribe()
        tally = await db.tally(topic, sent)
        print(
            f"\n[slow consumer, QoS 1, block] {tally.describe()}; slow subscriber saw "
            f"{len(seen)}; peak queue {probe.peak_queue} (capacity {CAPACITY}); event-loop "
            f"lag p99 {probe.lag_p99_ms():.1f} ms"
        )
        assert not tally.missing and tally.duplicates == 0, tally.describe()
        assert seen == list(range(sent)), "the slow subscriber sees every event, in order"
        assert probe.peak_queue <= CAPACITY
    finally:
        sim.close()
        await db.close()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
async def test_slow_subscriber_drops_qos0_and_counts_them(
    tmp_path: Path, mosquitto: PrivateMosquitto, start_gateway: Any, policy: str
) -> None:
    dev = unique("dev")
    topic = f"devices/{dev}/telemetry"
    sent = 3000
    settings = make_settings(
        tmp_path,
        ("127.0.0.1", mosquitto.port),
        device_ids=[dev],
        eventbus={"capacity": CAPACITY, "overflow": "block"},
        database={"batch_size": 200},
        mqtt={"qos": 0},
    )
    dropped = EVENTBUS_DROPPED.labels(subscriber="slow", reason=policy)
    other = EVENTBUS_DROPPED.labels(
        subscriber="slow", reason="drop_newest" if policy == "drop_oldest" else "drop_oldest"
    )
    store_drops = [
        EVENTBUS_DROPPED.labels(subscriber="store", reason=reason)
        for reason in ("drop_oldest", "drop_newest")
    ]
    before = dropped._value.get(), other._value.get(), [c._value.get() for c in store_drops]
    db = Db(settings.database.url)
    sim = SeqDevice("127.0.0.1", mosquitto.port)
    try:
        async with start_gateway(settings) as gateway, _Probe(gateway) as probe:
            seen, unsubscribe = _slow_subscriber(gateway, topic, policy, probe)
            await wait_subscribed(sim, db, dev)
            await asyncio.to_thread(sim.publish_seq, topic, range(sent), qos=0)
            # QoS 0 in order on one connection: once the last one is stored, all are.
            await wait_until(
                lambda: _has_seq(db, topic, sent - 1), timeout=90, what="last message stored"
            )
            assert await gateway.bus.drain(60), "the bus did not drain"
            unsubscribe()
        stored = await db.seqs(topic)
        drops = dropped._value.get() - before[0]
        print(
            f"\n[slow consumer, QoS 0, {policy}] sent {sent}, stored {len(stored)}, slow "
            f"subscriber saw {len(seen)}, dropped {drops:.0f} ({policy}); peak queue "
            f"{probe.peak_queue} (capacity {CAPACITY}); event-loop lag p99 "
            f"{probe.lag_p99_ms():.1f} ms"
        )
        assert sorted(stored) == list(range(sent)), "the store (block) keeps every QoS 0 message"
        assert drops > 0, "publishing at 10x the subscriber's rate must overflow it"
        assert len(seen) + drops == len(stored), "every drop is counted, none is silent"
        assert other._value.get() == before[1], "drops are counted under their own policy"
        assert [c._value.get() for c in store_drops] == before[2], "the store never drops"
        assert seen == sorted(seen), "what the slow subscriber sees stays in order"
        if policy == "drop_newest":
            assert seen[: CAPACITY // 2] == list(range(CAPACITY // 2)), "oldest kept"
        else:
            assert seen[-1] == sent - 1, "drop_oldest keeps the newest"
        assert probe.peak_queue <= CAPACITY
    finally:
        sim.close()
        await db.close()


async def _has_seq(db: Db, topic: str, seq: int) -> bool:
    return seq in await db.seqs(topic)
