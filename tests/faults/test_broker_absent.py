"""A gateway that starts before its broker: degraded, HTTP still stored, MQTT once it answers.

A broker that refuses us (a bad password, a certificate we do not trust) is different: it
will not fix itself, so ``flux run`` says so in one line and exits non-zero.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
import trustme

from tests.harness import (
    Db,
    GatewayProcess,
    PrivateMosquitto,
    SeqDevice,
    clean_env,
    free_port,
    mosquitto_available,
    unique,
    wait_until,
    write_config,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto on PATH"),
]

EXIT_FAILURE = 1


async def test_the_gateway_starts_without_a_broker_and_takes_mqtt_once_it_answers(
    tmp_path: Path,
) -> None:
    dev = unique("dev")
    topic = f"devices/{dev}/telemetry"
    broker = PrivateMosquitto(port=free_port())
    config = write_config(tmp_path, mqtt_port=broker.port, dev=dev)
    db = Db(f"sqlite+aiosqlite:///{tmp_path}/flux.db")
    gateway = GatewayProcess(config, env=clean_env())
    gateway.start()
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=5) as http:

            async def serving() -> bool:
                assert gateway.returncode() is None, gateway.log()[-2000:]
                try:
                    return (await http.get("/health")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_until(serving, timeout=60, what="the API up without a broker")
            ready = await http.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["degraded"] == ["mqtt_disconnected"], ready.json()
            posted = await http.post("/api/v1/event", json={"topic": topic, "payload": {"seq": 0}})
            assert posted.status_code == 201, posted.text
            metrics = (await http.get("/metrics")).text
            assert 'flux_degraded{reason="mqtt_disconnected"} 1.0' in metrics

            broker.start()
            await gateway.wait_ready(timeout=60)
            sim = SeqDevice("127.0.0.1", broker.port)
            try:
                sim.publish_seq(topic, range(1, 51))
                await wait_until(lambda: db.has_all(topic, 51), timeout=60, what="MQTT stored")
                await wait_until(sim.all_acked, timeout=30, what="every PUBACK")
            finally:
                sim.close()
        gateway.signal(signal.SIGTERM)
        assert await gateway.wait_exit() == 0, gateway.log()[-2000:]
        assert "running without MQTT ingest until the broker answers" in gateway.log()
    finally:
        gateway.kill()
        broker.cleanup()
        await db.close()


def _one_line_error(log: str) -> str:
    """The last line of a failed run, checked to be ``flux: ...`` with no traceback."""
    assert "Traceback" not in log, log[-3000:]
    last = log.strip().splitlines()[-1]
    assert last.startswith("flux: cannot connect to the MQTT broker at"), log[-2000:]
    return last


async def test_a_refused_password_is_one_line_and_a_failed_exit(tmp_path: Path) -> None:
    broker = PrivateMosquitto(users={"flux": "right-password"})
    broker.start()
    config = write_config(
        tmp_path,
        mqtt_port=broker.port,
        dev=unique("dev"),
        mqtt={"username": "flux", "password": "wrong-password"},
    )
    gateway = GatewayProcess(config, env=clean_env())
    gateway.start()
    try:
        assert await gateway.wait_exit(timeout=60) == EXIT_FAILURE
        line = _one_line_error(gateway.log())
        assert "password" in line.lower() or "not authori" in line.lower(), line
    finally:
        gateway.kill()
        broker.cleanup()


async def test_a_broker_that_refuses_us_after_a_degraded_start_stops_the_gateway(
    tmp_path: Path,
) -> None:
    """The broker comes up after the gateway, and refuses its password: not retried forever."""
    broker = PrivateMosquitto(port=free_port(), users={"flux": "right-password"})
    config = write_config(
        tmp_path,
        mqtt_port=broker.port,
        dev=unique("dev"),
        mqtt={"username": "flux", "password": "wrong-password", "reconnect_max_delay_s": 0.5},
    )
    gateway = GatewayProcess(config, env=clean_env())
    gateway.start()
    try:
        await wait_until(
            lambda: "running without MQTT ingest" in gateway.log(),
            timeout=60,
            what="a degraded start",
        )
        broker.start()
        assert await gateway.wait_exit(timeout=60) == EXIT_FAILURE
        _one_line_error(gateway.log())
    finally:
        gateway.kill()
        broker.cleanup()


async def test_an_untrusted_broker_certificate_is_one_line_and_a_failed_exit(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()  # a CA nobody told the gateway about
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key = tmp_path / "broker.pem", tmp_path / "broker.key"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    broker = PrivateMosquitto(tls=(chain, key))
    broker.start()
    config = write_config(tmp_path, mqtt_port=broker.port, dev=unique("dev"))
    text = config.read_text().replace(
        f'url = "mqtt://127.0.0.1:{broker.port}"', f'url = "mqtts://127.0.0.1:{broker.port}"'
    )
    config.write_text(text)
    gateway = GatewayProcess(config, env=clean_env())
    gateway.start()
    try:
        assert await gateway.wait_exit(timeout=60) == EXIT_FAILURE
        line = _one_line_error(gateway.log())
        assert "certificate" in line.lower(), line
    finally:
        gateway.kill()
        broker.cleanup()
