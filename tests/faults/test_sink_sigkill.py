"""SIGKILL of a gateway while it forwards a backlog to an upstream broker: after a restart
nothing is missing upstream, order per device holds, and every duplicate carries the event id
of its first copy (a consumer can deduplicate)."""

from __future__ import annotations

import signal
from collections import defaultdict
from pathlib import Path

import pytest

from flux.store.schema import outbox
from tests.harness import (
    Db,
    GatewayProcess,
    PrivateMosquitto,
    SeqDevice,
    Upstream,
    UpstreamListener,
    first_arrivals_in_order,
    unique,
    wait_until,
    write_config,
)

#: Its waits add up to more than the suite's 120 s per test: a slow run should end in the
#: wait that names what was missing (with the gateway's log), not in pytest-timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PER_DEVICE = 5000


async def test_sigkill_while_forwarding_a_backlog_loses_nothing_upstream(
    tmp_path: Path, mosquitto: PrivateMosquitto, upstream: Upstream
) -> None:
    devs = [unique("dev") for _ in range(2)]
    database_url = f"sqlite+aiosqlite:///{tmp_path}/flux.db"

    def config(name: str) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        return write_config(
            directory,
            mqtt_port=mosquitto.port,
            dev="+",
            database_url=database_url,
            mqtt={"client_id": "flux-sink-kill", "topics": [f"devices/{d}/#" for d in devs]},
            **{"sinks.cloud": upstream.sink(topic="up/{topic}", topics=["devices/+/telemetry"])},
        )

    upstream.broker.stop()
    listener_ready = False
    db = Db(database_url)
    sim = SeqDevice("127.0.0.1", mosquitto.port)
    first = GatewayProcess(config("first"), name="first")
    second = GatewayProcess(config("second"), name="second")
    listener: UpstreamListener | None = None
    try:
        first.start()
        await first.wait_ready()
        for dev in devs:
            sim.publish_seq(f"devices/{dev}/telemetry", range(PER_DEVICE))

        async def backlog_stored() -> bool:
            for dev in devs:
                if not await db.has_all(f"devices/{dev}/telemetry", PER_DEVICE):
                    return False
            return True

        await wait_until(backlog_stored, timeout=60, what="the backlog stored")
        upstream.broker.start()
        listener = UpstreamListener(upstream, "up/devices/#")
        listener_ready = True
        await wait_until(
            lambda: len(listener.received()) >= 300, timeout=60, what="forwarding under way"
        )
        first.signal(signal.SIGKILL)
        assert await first.wait_exit() == -signal.SIGKILL
        arrived_before = len(listener.received())
        assert arrived_before < 2 * PER_DEVICE, "the kill came after the whole backlog"

        second.start()
        await second.wait_ready()

        def complete() -> bool:
            assert listener is not None
            order = first_arrivals_in_order(listener.received())
            return all(len(order.get(dev, [])) == PER_DEVICE for dev in devs)

        try:
            await wait_until(complete, timeout=120, what="the whole backlog upstream")
        except AssertionError:
            order = first_arrivals_in_order(listener.received())
            arrived = {dev: len(order.get(dev, [])) for dev in devs}
            left = await db.count(outbox)  # still there: stuck; gone: lost on the way
            raise AssertionError(
                f"upstream has {arrived} of {PER_DEVICE} per device, {left} outbox rows left:\n"
                f"{second.log()[-3000:]}"
            ) from None
        await wait_until(
            lambda: _outbox_empty(db), timeout=30, what="the delivered rows deleted"
        )
        second.signal(signal.SIGTERM)
        assert await second.wait_exit() == 0, second.log()[-3000:]

        received = listener.received()
        order = first_arrivals_in_order(received)
        for dev in devs:
            assert order[dev] == list(range(PER_DEVICE)), f"{dev} out of order"
        copies: dict[tuple[str, int], set[str | None]] = defaultdict(set)
        for topic, payload, event_id in received:
            copies[(topic, payload["seq"])].add(event_id)
        assert all(len(ids) == 1 and None not in ids for ids in copies.values())
        duplicates = len(received) - len(copies)
        print(
            f"\n[sink SIGKILL] {arrived_before} forwarded before the kill; "
            f"{len(copies)} distinct upstream, {duplicates} duplicates"
        )
    finally:
        first.kill()
        second.kill()
        if listener_ready and listener is not None:
            listener.close()
        sim.close()
        await db.close()


async def _outbox_empty(db: Db) -> bool:
    return await db.count(outbox) == 0
