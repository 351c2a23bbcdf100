"""SIGKILL while a rule publishes (QoS 1) for every message, then a restart.

A rule republishes every telemetry message on ``echo/<device>``. The gateway is killed
right after it wrote a round of publishes, before their PUBACKs came back
(``FLUX_FAULT=publish_written:N``); from outside at an arbitrary moment of the drain; or
while the network swallows everything its publishing session sends (a proxy between it and
the broker), so publishes it handed off never reach the broker. Pass: after a restart
without the fault, a subscriber that listened throughout has received the echo of every
message the device got a PUBACK for (at least once; duplicates only for redelivered
messages), and the database holds every message.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    Db,
    GatewayProcess,
    Listener,
    MqttProxy,
    PrivateMosquitto,
    SeqDevice,
    clean_env,
    mosquitto_available,
    prime_session,
    unique,
    wait_until,
)
from tests.harness import write_config as _write_config

SENT = 3000

ECHO_RULE = """
[[rules]]
id = "echo"
topic = "devices/+/telemetry"
when = "true"

[[rules.actions]]
type = "publish"
topic = "echo/{device_id}"
qos = 1
payload = { seq = "{payload.seq}" }
"""


def echoed(listener: Listener) -> list[int]:
    """The sequence numbers of the echoes received so far (duplicates included)."""
    return [int(payload["seq"]) for _, payload in listener.received()]


@pytest.fixture
def wide_mosquitto() -> Iterator[PrivateMosquitto]:
    """A Mosquitto whose Receive Maximum (1000) lets a whole batch's publishes be in flight."""
    if not mosquitto_available():
        pytest.skip("mosquitto is not on PATH; this test needs a private broker")
    broker = PrivateMosquitto(persistent=True, max_inflight=1000)
    broker.start()
    try:
        yield broker
    finally:
        broker.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["publish_written:2", "mid_drain", "publishes_swallowed"])
async def test_sigkill_while_publishing_loses_no_publish_of_an_acknowledged_message(
    tmp_path: Path, wide_mosquitto: PrivateMosquitto, kill: str
) -> None:
    mosquitto = wide_mosquitto
    dev = unique("dev")
    topic = f"devices/{dev}/telemetry"
    client_id = f"flux-pubkill-{uuid.uuid4().hex[:8]}"
    database_url = f"sqlite+aiosqlite:///{tmp_path}/flux.db"

    def config(name: str) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        path = _write_config(
            directory,
            mqtt_port=proxy.port,
            dev=dev,
            database_url=database_url,
            mqtt={"client_id": client_id},
            database={"batch_size": 100},
        )
        (directory / "rules" / "echo.toml").write_text(ECHO_RULE)
        return path

    db = Db(database_url)
    proxy = MqttProxy(mosquitto.port)
    sim = SeqDevice("127.0.0.1", mosquitto.port)
    listener = Listener(("127.0.0.1", mosquitto.port), f"echo/{dev}")
    gateways: list[GatewayProcess] = []
    try:
        prime = GatewayProcess(config("prime"), name="prime")
        gateways.append(prime)
        await prime_session(prime, sim, db, dev)

        fault = kill if kill.startswith("publish_written") else ""
        armed = GatewayProcess(
            config("armed"), env=clean_env(FLUX_FAULT=fault) if fault else None, name="armed"
        )
        gateways.append(armed)
        if kill == "publishes_swallowed":
            # Live traffic (a replayed backlog may overrun the gateway's Receive Maximum).
            armed.start()
            await armed.wait_ready()
            sim.publish_seq(topic, range(-1, 0))  # a warm-up: the publishing session opens
            await wait_until(lambda: -1 in set(echoed(listener)), what="the warm-up echo")
            proxy.blackhole("-pub")
            sim.publish_seq(topic, range(SENT))
            await wait_until(
                lambda: db.stored_at_least(topic, 1 + 150),
                what="messages stored while the network swallows their publishes",
            )
            armed.signal(signal.SIGKILL)
        else:
            sim.publish_seq(topic, range(SENT))
            await wait_until(sim.all_acked, timeout=60, what="the broker's PUBACKs to the device")
            armed.start()
            if kill == "mid_drain":
                await wait_until(
                    lambda: db.stored_at_least(topic, SENT // 3),
                    timeout=60,
                    what="a third of the backlog stored",
                )
                armed.signal(signal.SIGKILL)
        code = await armed.wait_exit(timeout=60)
        assert code == -signal.SIGKILL, f"expected death by SIGKILL, got {code}:\n{armed.log()}"
        echoed_before_restart = len(set(echoed(listener)))
        assert echoed_before_restart < SENT, "the kill came after the whole drain"
        proxy.heal()
        proxy.drop_all()

        again = GatewayProcess(config("again"), name="again")
        gateways.append(again)
        again.start()
        await wait_until(sim.all_acked, timeout=60, what="the broker's PUBACKs to the device")
        await wait_until(lambda: _stored_all(db, topic), timeout=90, what="all messages stored")
        await wait_until(
            lambda: set(echoed(listener)) >= set(range(SENT)),
            timeout=60,
            what="the echo of every acknowledged message",
        )
        again.signal(signal.SIGTERM)
        assert await again.wait_exit() == 0, again.log()[-3000:]

        duplicates = len(echoed(listener)) - len(set(echoed(listener)))
        print(
            f"\n[{kill}] echoes before the restart: {echoed_before_restart}; after: "
            f"{len(set(echoed(listener)))} distinct, {duplicates} duplicates"
        )
        assert sim.acked >= set(range(SENT))
        assert not (sim.acked - set(echoed(listener)))
        assert await db.dead_letters() == []
    finally:
        for gateway in gateways:
            gateway.kill()
        listener.close()
        sim.close()
        proxy.close()
        await db.close()


async def _stored_all(db: Db, topic: str) -> bool:
    return set(await db.seqs(topic)) >= set(range(SENT))
