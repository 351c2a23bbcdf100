"""Durable rule state: the same device stream gives the same alerts with or without a
SIGKILL in the middle, and a device moved to another instance keeps its state.

The shipped rules run on a stream of three sensors (one hot: ``overheat`` on every reading;
one warming 3 degC a minute on its own clock: ``temperature-rising-fast`` on every reading
10 s past its reference; one quiet). The stream waits in the broker for the gateway's
persistent session. Once it runs to the end uninterrupted; once the gateway dies by SIGKILL
right after its 3rd batch commits (before any PUBACK of that batch) and a new process
takes over. The alert sets, keyed by rule, device and the reading's ``seq``, are equal:
the rate rule's reference readings survived in ``rule_state``; a redelivered reading may
alert twice, which the set ignores. The shipped window rules close their windows on the
wall clock, so whether one closes inside a run depends on when the run starts, not on the
stream: their alerts are left out of the comparison (``test_window_restart.py`` covers them).
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import time
import uuid
from pathlib import Path

import orjson
import pytest

from flux.rules import load_rules_path
from tests.harness import (
    Db,
    FleetDevice,
    GatewayProcess,
    PrivateMosquitto,
    SeqDevice,
    clean_env,
    prime_session,
    unique,
    wait_until,
)
from tests.harness import write_config as _write_config

REPO = Path(__file__).resolve().parents[2]
BATCH = 20
READINGS = 40
#: Fleet indices: hot (overheat), warming (temperature-rising-fast), quiet.
SENSORS = (0, FleetDevice.HEATING_AT, 5)

AlertKey = tuple[str, str, int]


def stream() -> list[tuple[str, bytes]]:
    """The sensors' readings, 5 s apart on their own clocks, interleaved."""
    first_ts = time.time() - READINGS * 5
    sensors = [FleetDevice(i, seed=3, first_ts=first_ts, interval_s=5) for i in SENSORS]
    for sensor in sensors:
        if sensor.heating:
            sensor.temperature, sensor.heating = 18.0, True
    return [(s.topic, orjson.dumps(s.reading())) for _ in range(READINGS) for s in sensors]


def clock_rules() -> set[str]:
    """The shipped rules whose alerts follow the wall clock: window rules on processing time."""
    rules = load_rules_path(REPO / "rules").rules
    return {rule.id for rule in rules if rule.window is not None and not rule.time_field}


def alert_set(path: Path) -> set[AlertKey]:
    """The alerts of rules that follow the stream alone, keyed by rule, device and ``seq``."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT a.rule_id, a.device_id, e.payload FROM alerts a "
            "JOIN events e ON e.id = a.event_id"
        ).fetchall()
    skipped = clock_rules()
    return {
        (rule, device, orjson.loads(payload)["seq"])
        for rule, device, payload in rows
        if rule not in skipped
    }


def stored(path: Path) -> int:
    """Distinct readings stored (a redelivered one is stored again, under a new event id)."""
    with sqlite3.connect(path) as conn:
        (count,) = conn.execute(
            "SELECT count(DISTINCT device_id || ':' || json_extract(payload, '$.seq')) "
            "FROM events WHERE topic LIKE '%/telemetry'"
        ).fetchone()
    return int(count)


async def run_stream(
    tmp_path: Path, mosquitto: PrivateMosquitto, name: str, *, kill: bool
) -> set[AlertKey]:
    """Feed the stream to a gateway (killed after its 3rd commit when ``kill``); its alerts."""
    folder = tmp_path / name
    folder.mkdir()
    database = folder / "flux.db"
    client_id = f"flux-state-{uuid.uuid4().hex[:8]}"
    dev = unique("dev")

    def config(stage: str, **database_settings: object) -> Path:
        directory = folder / stage
        directory.mkdir()
        shutil.copytree(REPO / "rules", directory / "rules", dirs_exist_ok=True)
        return _write_config(
            directory,
            mqtt_port=mosquitto.port,
            dev=dev,
            database_url=f"sqlite+aiosqlite:///{database}",
            mqtt={"client_id": client_id, "topics": ["devices/#"]},
            database={"batch_size": BATCH, **database_settings},
        )

    db = Db(f"sqlite+aiosqlite:///{database}")
    sim = SeqDevice("127.0.0.1", mosquitto.port)
    gateways: list[GatewayProcess] = []
    try:
        prime = GatewayProcess(config("prime"), name=f"{name}-prime")
        gateways.append(prime)
        await prime_session(prime, sim, db, dev)
        infos = [sim.client.publish(topic, payload, qos=1) for topic, payload in stream()]
        for info in infos:
            info.wait_for_publish(10)
        if kill:
            armed = GatewayProcess(
                config("armed", flush_interval_ms=60_000),
                env=clean_env(FLUX_FAULT="after_commit:3"),
                name=f"{name}-armed",
            )
            gateways.append(armed)
            armed.start()
            code = await armed.wait_exit(timeout=60)
            assert code == -signal.SIGKILL, f"expected death by SIGKILL, got {code}:\n{armed.log()}"
            assert 0 < stored(database) < len(infos)
        last = GatewayProcess(config("last"), name=f"{name}-last")
        gateways.append(last)
        last.start()
        try:
            await wait_until(lambda: stored(database) == len(infos), timeout=60)
        except AssertionError:
            raise AssertionError(
                f"{stored(database)} of {len(infos)} readings stored:\n{last.log()[-3000:]}"
            ) from None
        last.signal(signal.SIGTERM)
        assert await last.wait_exit() == 0, last.log()[-3000:]
        return alert_set(database)
    finally:
        for gateway in gateways:
            gateway.kill()
        sim.close()
        await db.close()


@pytest.mark.slow
async def test_a_sigkill_in_the_middle_gives_the_same_alerts(
    tmp_path: Path, mosquitto: PrivateMosquitto
) -> None:
    uninterrupted = await run_stream(tmp_path, mosquitto, "whole", kill=False)
    killed = await run_stream(tmp_path, mosquitto, "killed", kill=True)
    assert "hot-average" in clock_rules()  # the filter finds the shipped window rule
    rising = {key for key in uninterrupted if key[0] == "temperature-rising-fast"}
    assert len(rising) >= READINGS // 3, uninterrupted  # the stream exercises the rate rule
    assert {key[0] for key in uninterrupted} >= {"overheat", "temperature-rising-fast"}
    assert killed == uninterrupted, (
        f"missing after the kill: {sorted(uninterrupted - killed)}; "
        f"extra: {sorted(killed - uninterrupted)}"
    )
