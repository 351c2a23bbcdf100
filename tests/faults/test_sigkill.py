"""Scenario 2: the gateway killed with SIGKILL at three fault points, then restarted.

The process runs as ``python -m flux run`` with ``FLUX_FAULT`` arming one point of
``flux/faults.py``. Its persistent session is primed first (subscribed, then stopped
cleanly), the device's 500 messages wait in the broker, and the armed gateway replays them
in full batches of 50 until it dies on the 3rd batch. Pass: the database holds exactly the
committed batches (nothing of the one in flight), device totals agree with the event rows
(the batch and its device upsert commit together), and after a restart without the fault
every sequence number is stored: 0 missing, duplicates only from the unacknowledged window.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest

from flux.store.schema import events
from tests.harness import (
    Db,
    GatewayProcess,
    PrivateMosquitto,
    SeqDevice,
    clean_env,
    prime_session,
    unique,
    wait_until,
)
from tests.harness import write_config as _write_config

BATCH = 50
RECEIVE_MAXIMUM = 2 * BATCH
SENT = 500

# (point armed, committed rows when it fires): the 3rd batch dies before its commit, or
# after it (before any PUBACK of it), or half way through acknowledging it.
FAULTS = [
    ("before_commit:3", 2 * BATCH),
    ("after_commit:3", 3 * BATCH),
    (f"mid_ack:{2 * BATCH + BATCH // 2}", 3 * BATCH),
]


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "committed"), FAULTS, ids=[f[0] for f in FAULTS])
async def test_sigkill_at_a_fault_point_loses_nothing(
    tmp_path: Path, mosquitto: PrivateMosquitto, fault: str, committed: int
) -> None:
    dev = unique("dev")
    topic = f"devices/{dev}/telemetry"
    client_id = f"flux-kill-{uuid.uuid4().hex[:8]}"

    def config(name: str, **database: object) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        return _write_config(
            directory,
            mqtt_port=mosquitto.port,
            dev=dev,
            database_url=f"sqlite+aiosqlite:///{tmp_path}/flux.db",
            mqtt={"client_id": client_id},
            database={"batch_size": BATCH, **database},
        )

    db = Db(f"sqlite+aiosqlite:///{tmp_path}/flux.db")
    sim = SeqDevice("127.0.0.1", mosquitto.port)
    gateways: list[GatewayProcess] = []
    try:
        # 1. Prime the persistent session: subscribed, then a clean stop.
        prime = GatewayProcess(config("prime"), name="prime")
        gateways.append(prime)
        await prime_session(prime, sim, db, dev)

        # 2. The device's stream waits in the broker for the gateway's session.
        sim.publish_seq(topic, range(SENT))
        await wait_until(sim.all_acked, timeout=30, what="the broker's PUBACKs to the device")

        # 3. The armed gateway replays it in full batches (a partial one would wait 60 s).
        armed = GatewayProcess(
            config("armed", flush_interval_ms=60_000),
            env=clean_env(FLUX_FAULT=fault),
            name="armed",
        )
        gateways.append(armed)
        armed.start()
        code = await armed.wait_exit(timeout=60)
        assert code == -signal.SIGKILL, f"expected death by SIGKILL, got {code}:\n{armed.log()}"

        after_kill = await db.tally(topic, SENT)
        assert after_kill.stored_rows == committed, (
            f"{fault}: the database must hold exactly the committed batches "
            f"({committed} rows), no part of the batch in flight; {after_kill.describe()}"
        )
        assert after_kill.duplicates == 0
        rows_for_device = await db.count(events, events.c.device_id == dev)
        assert await db.device_count(dev) == rows_for_device, "device upsert and events diverge"
        assert await db.integrity_ok() == "ok"

        # 4. Restart without the fault: the broker redelivers the rest.
        started = time.monotonic()
        again = GatewayProcess(config("again"), name="again")
        gateways.append(again)
        again.start()
        await wait_until(lambda: db.has_all(topic, SENT), timeout=60, what="all messages stored")
        recovery_s = time.monotonic() - started
        again.signal(signal.SIGTERM)
        assert await again.wait_exit() == 0, again.log()[-3000:]

        tally = await db.tally(topic, SENT)
        window = BATCH + RECEIVE_MAXIMUM
        print(
            f"\n[fault {fault}] after kill: {after_kill.stored_rows} rows committed; "
            f"after restart: {tally.describe()}; recovery {recovery_s:.1f}s (process start "
            f"to all stored)"
        )
        assert not tally.missing, f"{fault}: {tally.describe()}"
        assert tally.duplicates <= window, (
            f"{fault}: duplicates beyond the in-flight window of {window}: {tally.describe()}"
        )
        if fault.startswith("before_commit"):
            assert tally.duplicates == 0, f"nothing uncommitted can come back twice: {tally}"
        else:
            # The killed batch was committed and never acknowledged: it is stored again.
            assert tally.duplicates >= BATCH // 2, f"expected redelivery: {tally.describe()}"
        assert await db.device_count(dev) == await db.count(events, events.c.device_id == dev)
        assert await db.integrity_ok() == "ok"
    finally:
        for gateway in gateways:
            gateway.kill()
        sim.close()
        await db.close()
