"""SIGKILL of a gateway while it forwards a backlog to an upstream broker: after a restart
nothing is missing upstream, order per device holds, and every duplicate carries the event id
of its first copy (a consumer can deduplicate)."""

from __future__ import annotations

import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
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

    # Subscribed before the upstream goes down: its session and subscription persist, so the
    # broker keeps what the gateway forwards before the listener is back. (Subscribing after
    # the restart raced the gateway's first publishes, which the broker then had nobody for.)
    listener = UpstreamListener(upstream, "up/devices/#")
    upstream.broker.stop()
    db = Db(database_url)
    sim = SeqDevice("127.0.0.1", mosquitto.port)
    first = GatewayProcess(config("first"), name="first")
    second = GatewayProcess(config("second"), name="second")
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

        async def forwarding() -> bool:
            return int((await _sink(first))["sent"]) >= 300

        await wait_until(forwarding, timeout=60, what="forwarding under way")
        sent_before = (await _sink(first))["sent"]
        first.signal(signal.SIGKILL)
        assert await first.wait_exit() == -signal.SIGKILL
        assert await db.count(outbox) > 0, "the kill came after the whole backlog"

        second.start()
        await second.wait_ready()

        def complete() -> bool:
            order = first_arrivals_in_order(listener.received())
            return all(len(order.get(dev, [])) == PER_DEVICE for dev in devs)

        try:
            await wait_until(complete, timeout=120, what="the whole backlog upstream")
        except AssertionError:
            order = first_arrivals_in_order(listener.received())
            arrived = {dev: len(order.get(dev, [])) for dev in devs}
            missing = {
                dev: _ranges(set(range(PER_DEVICE)) - set(order.get(dev, []))) for dev in devs
            }
            left = await db.count(outbox)  # still there: stuck; gone: lost on the way
            sink = await _sink(second)  # sent, backlog, connected, last error
            raise AssertionError(
                f"upstream has {arrived} of {PER_DEVICE} per device (missing {missing}), "
                f"{left} outbox rows left; the sink: {sink}\n{second.log()[-3000:]}"
            ) from None
        await wait_until(lambda: _outbox_empty(db), timeout=30, what="the delivered rows deleted")
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
            f"\n[sink SIGKILL] {sent_before} or more confirmed before the kill; "
            f"{len(copies)} distinct upstream, {duplicates} duplicates"
        )
    finally:
        first.kill()
        second.kill()
        listener.close()
        sim.close()
        await db.close()


async def _sink(gateway: GatewayProcess) -> dict[str, Any]:
    """What the gateway's API says of its upstream sink."""
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=5) as client:
        response = await client.get("/api/v1/sinks/cloud")
    response.raise_for_status()
    return dict(response.json())


async def _outbox_empty(db: Db) -> bool:
    return await db.count(outbox) == 0


def _ranges(seqs: set[int]) -> list[tuple[int, int]]:
    """``seqs`` as (first, last) runs, for a readable failure."""
    runs: list[tuple[int, int]] = []
    for seq in sorted(seqs):
        if runs and runs[-1][1] == seq - 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs
