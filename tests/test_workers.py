"""``flux run --workers N``: real supervisor and worker processes, a real Mosquitto, SQLite.

The slow tests start ``python -m flux run --workers 2`` and judge from outside: both
workers answer on their own ports, the broker splits a shared subscription between them,
every message lands once in the one database, a SIGKILLed worker comes back and loses
nothing the broker acknowledged, SIGTERM stops everything with exit code 0, and no worker
outlives the supervisor (even one killed with SIGKILL). The fast ones cover the plan, the
start-up refusals (exit code 2) and the restart policy with stand-in worker commands.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from flux.config import Settings, load_settings
from flux.errors import ConfigError
from flux.workers import Supervisor, plan_workers, worker_overrides
from tests.harness import (
    Db,
    PrivateMosquitto,
    SeqDevice,
    clean_env,
    free_port,
    metric_value,
    wait_until,
    write_config,
)

DEVICES = 4
PER_DEVICE = 100


def consecutive_free_ports(count: int) -> int:
    """A port p such that p .. p+count-1 are all free now (worker i listens on p + i)."""
    for _ in range(200):
        base = free_port()
        if base + count > 65535:
            continue
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise RuntimeError(f"no {count} consecutive free ports found")


def children_of(pid: int) -> dict[int, int | None]:
    """Live children of ``pid`` (from /proc) with their ``FLUX_WORKER_INDEX``, if any."""
    found: dict[int, int | None] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) != pid or fields[0] == "Z":
            continue
        index = None
        for item in environ.split(b"\0"):
            if item.startswith(b"FLUX_WORKER_INDEX="):
                index = int(item.partition(b"=")[2])
        found[int(entry.name)] = index
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class Supervised:
    """``python -m flux run --workers N --config ...`` as a child process, log in a file."""

    def __init__(self, config: Path, *, workers: int, http_port: int) -> None:
        self.config = config
        self.workers = workers
        self.http_port = http_port
        self.log_path = config.parent / "supervisor.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.seen: set[int] = set()

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            argv = ["run", "--workers", str(self.workers), "--config", str(self.config)]
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flux", *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_env(PYTHONUNBUFFERED="1"),
                cwd=self.config.parent,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def workers_now(self) -> dict[int, int]:
        """Worker index -> pid of the workers running now (also remembered in ``seen``)."""
        running = {index: pid for pid, index in children_of(self.pid).items() if index is not None}
        self.seen.update(running.values())
        return running

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.http_port + index}"

    async def ready(self, index: int) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"supervisor exited {self.process.returncode}:\n{self.log()}")
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                return (await client.get(f"{self.url(index)}/ready")).status_code == 200
        except httpx.HTTPError:
            return False

    async def wait_all_ready(self, timeout: float = 60) -> None:
        """Wait until every worker answers /ready; on timeout, fail with the supervisor's log."""
        try:
            await wait_until(self.all_ready, timeout=timeout, what="every worker /ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; supervisor log:\n{self.log()[-4000:]}") from None

    async def all_ready(self) -> bool:
        return all([await self.ready(index) for index in range(self.workers)])

    async def mqtt_messages(self, index: int) -> int:
        """The worker's ``flux_mqtt_messages_total{qos="1"}`` from its HTTP /metrics."""
        async with httpx.AsyncClient(timeout=2) as client:
            text = (await client.get(f"{self.url(index)}/metrics")).text
        return int(metric_value(text, "flux_mqtt_messages_total", qos="1") or 0)

    async def wait_exit(self, timeout: float = 60) -> int:
        assert self.process is not None
        process = self.process
        await wait_until(lambda: process.poll() is not None, timeout=timeout, what="exit")
        return process.returncode

    def kill(self) -> None:
        """Test clean-up: the supervisor and every worker it ever had."""
        for pid in self.seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def start_config(
    tmp_path: Path,
    broker: PrivateMosquitto,
    devs: list[str],
    *,
    database: dict[str, Any] | None = None,
) -> Path:
    return write_config(
        tmp_path,
        mqtt_port=broker.port,
        dev=devs[0],
        http_port=consecutive_free_ports(2),
        mqtt={
            "client_id": f"flux-workers-{uuid.uuid4().hex[:8]}",
            "topics": [f"devices/{dev}/#" for dev in devs],
        },
        database=database or {},
    )


async def both_subscribed(gw: Supervised, sim: SeqDevice, dev: str) -> int:
    """Publish probes until each worker has received one: the broker shares the
    subscription between two live sessions. Return how many probes went out."""
    probes = 0

    async def each_has_one() -> bool:
        nonlocal probes
        counts = [await gw.mqtt_messages(index) for index in range(gw.workers)]
        if all(counts):
            return True
        if sum(counts) >= probes:  # every probe so far arrived; send another
            sim.client.publish(f"devices/{dev}/probe", b'{"probe": true}', qos=1)
            probes += 1
        return False

    await wait_until(each_has_one, timeout=30, what="every worker receiving probes")

    async def probes_in() -> bool:
        return sum([await gw.mqtt_messages(i) for i in range(gw.workers)]) >= probes

    await wait_until(probes_in, timeout=30, what="every probe received")
    return probes


def publish_streams(sims: list[SeqDevice], devs: list[str], count: int, pace: int = 0) -> None:
    """Each device publishes seq 0..count-1 on its own telemetry topic, all at once."""
    threads = [
        threading.Thread(
            target=sim.publish_seq,
            args=(f"devices/{dev}/telemetry", range(count)),
            kwargs={"pace_every": pace},
        )
        for sim, dev in zip(sims, devs, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


# -- the real thing -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_two_workers_split_a_shared_subscription_and_stop_on_sigterm(
    tmp_path: Path, mosquitto: PrivateMosquitto
) -> None:
    devs = [f"wdev{uuid.uuid4().hex[:8]}-{k}" for k in range(DEVICES)]
    config = start_config(tmp_path, mosquitto, devs)
    http_port = int(load_settings(config, environ={}).server.port)
    url = load_settings(config, environ={}).database.url
    gw = Supervised(config, workers=2, http_port=http_port)
    db = Db(url)
    sims = [SeqDevice("127.0.0.1", mosquitto.port) for _ in devs]
    try:
        gw.start()
        await gw.wait_all_ready()
        assert sorted(gw.workers_now()) == [0, 1], gw.log()
        await both_subscribed(gw, sims[0], devs[0])
        before = [await gw.mqtt_messages(i) for i in range(2)]

        await asyncio.to_thread(publish_streams, sims, devs, PER_DEVICE)
        await wait_until(lambda: all(sim.all_acked() for sim in sims), what="broker PUBACKs")

        async def all_stored() -> bool:
            return all([await db.has_all(f"devices/{dev}/telemetry", PER_DEVICE) for dev in devs])

        await wait_until(all_stored, timeout=60, what=f"{DEVICES * PER_DEVICE} events stored")
        for dev in devs:
            tally = await db.tally(f"devices/{dev}/telemetry", PER_DEVICE)
            assert not tally.missing and tally.duplicates == 0, tally.describe()
        after = [await gw.mqtt_messages(i) for i in range(2)]
        received = [a - b for a, b in zip(after, before, strict=True)]
        print(f"\n[workers] messages per worker: {received}")
        assert sum(received) == DEVICES * PER_DEVICE, received
        assert all(received), f"one worker got nothing: {received}"
        assert "$share/flux/devices/" in gw.log()
        assert await db.integrity_ok() == "ok"

        workers = set(gw.workers_now().values())
        os.kill(gw.pid, signal.SIGTERM)
        assert await gw.wait_exit(timeout=90) == 0, gw.log()[-4000:]
        assert not [pid for pid in workers | gw.seen if alive(pid)], "a worker outlived it"
        assert gw.log().count("stopped with exit code 0") == 2, gw.log()[-4000:]
    finally:
        gw.kill()
        for sim in sims:
            sim.close()
        await db.close()


@pytest.mark.slow
async def test_a_killed_worker_is_restarted_and_nothing_acknowledged_is_lost(
    tmp_path: Path, mosquitto: PrivateMosquitto
) -> None:
    sent = 1500
    devs = [f"kdev{uuid.uuid4().hex[:8]}-{k}" for k in range(2)]
    config = start_config(tmp_path, mosquitto, devs, database={"batch_size": 100})
    settings = load_settings(config, environ={})
    gw = Supervised(config, workers=2, http_port=settings.server.port)
    db = Db(settings.database.url)
    sims = [SeqDevice("127.0.0.1", mosquitto.port) for _ in devs]
    try:
        gw.start()
        await gw.wait_all_ready()
        await both_subscribed(gw, sims[0], devs[0])
        victim = gw.workers_now()[1]

        stream = asyncio.create_task(asyncio.to_thread(publish_streams, sims, devs, sent, 1))

        async def flowing() -> bool:
            return len(await db.seqs(f"devices/{devs[0]}/telemetry")) >= sent // 5

        await wait_until(flowing, timeout=60, what="the stream flowing")
        os.kill(victim, signal.SIGKILL)
        assert not stream.done(), "the stream ended before the kill; nothing was tested"

        def replaced() -> bool:
            pid = gw.workers_now().get(1)
            return pid is not None and pid != victim

        await wait_until(replaced, timeout=30, what="worker 1 restarted")
        await wait_until(lambda: gw.ready(1), timeout=60, what="restarted worker 1 /ready")
        await stream
        await wait_until(lambda: all(sim.all_acked() for sim in sims), what="broker PUBACKs")

        async def all_stored() -> bool:
            return all([await db.has_all(f"devices/{dev}/telemetry", sent) for dev in devs])

        await wait_until(all_stored, timeout=90, what="every acknowledged message stored")
        tallies = [await db.tally(f"devices/{dev}/telemetry", sent) for dev in devs]
        print("\n[workers] after SIGKILL of worker 1: " + "; ".join(t.describe() for t in tallies))
        assert all(not t.missing for t in tallies)
        assert "exited unexpectedly with signal SIGKILL" in gw.log(), gw.log()[-4000:]
        assert await db.integrity_ok() == "ok"

        # A supervisor killed outright takes its workers with it (they drain and exit).
        workers = set(gw.workers_now().values())
        assert len(workers) == 2
        os.kill(gw.pid, signal.SIGKILL)
        await gw.wait_exit(timeout=10)
        await wait_until(
            lambda: not any(alive(pid) for pid in workers), timeout=60, what="orphans gone"
        )
        assert gw.log().count("[w0] INFO flux.app: flux stopped") >= 1, gw.log()[-4000:]
    finally:
        gw.kill()
        for sim in sims:
            sim.close()
        await db.close()


# -- start-up refusals (exit code 2, nothing started) -----------------------------------------


def _flux_run(config: Path, workers: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flux", "run", "--workers", str(workers), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(),
        cwd=config.parent,
    )


def test_invalid_configurations_stop_the_supervisor_with_exit_code_2(tmp_path: Path) -> None:
    db = tmp_path / "flux.db"
    base = f"[database]\nurl = 'sqlite+aiosqlite:///{db}'\n[mqtt]\nembedded = 'off'\n"
    config = tmp_path / "config.toml"

    config.write_text(base + "[eventbus]\ncapacity = 0\n")
    result = _flux_run(config, 2)
    assert result.returncode == 2, result.stderr
    assert "invalid configuration: eventbus.capacity" in result.stderr

    config.write_text(base + "[server]\nport = 65534\n[metrics]\nport = 0\n")
    result = _flux_run(config, 3)
    assert result.returncode == 2, result.stderr
    assert "server.port" in result.stderr and "worker 2 of 3" in result.stderr

    config.write_text(base + "[server]\nport = 8080\n[metrics]\nport = 8081\n")
    result = _flux_run(config, 2)
    assert result.returncode == 2, result.stderr
    assert "metrics.port" in result.stderr and "overlap" in result.stderr

    bad = subprocess.run(
        [sys.executable, "-m", "flux", "run", "--workers", "0", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "--workers" in bad.stderr
    assert not db.exists(), "nothing may start (not even migrations) on a configuration error"


def test_workers_refuse_an_embedded_amqtt_broker(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f"[database]\nurl = 'sqlite+aiosqlite:///{tmp_path}/flux.db'\n"
        f"[mqtt]\nurl = 'mqtt://127.0.0.1:{free_port()}'\nembedded = 'amqtt'\n"
        f"[server]\nport = 0\n[metrics]\nport = 0\n"
    )
    result = _flux_run(config, 2)
    assert result.returncode == 2, result.stderr
    assert "mqtt.embedded" in result.stderr and "amqtt" in result.stderr


# -- the plan and the supervisor's policy, with stand-in workers ---------------------------------


def test_each_worker_gets_its_own_session_and_ports() -> None:
    settings = Settings.model_validate(
        {"server": {"port": 8080}, "metrics": {"port": 0}, "mqtt": {"client_id": "7"}}
    )
    env = {"FLUX_mqtt__client_id": "'ignored'", "FLUX_EVENTBUS__CAPACITY": "64"}
    plans = plan_workers(settings, 3, config_path=None, environ=env)
    assert [p.settings.mqtt.client_id for p in plans] == ["7-w0", "7-w1", "7-w2"]
    assert [p.settings.server.port for p in plans] == [8080, 8081, 8082]
    assert [p.settings.metrics.port for p in plans] == [0, 0, 0]
    assert {p.settings.mqtt.shared_group for p in plans} == {"flux"}
    assert {p.settings.mqtt.embedded for p in plans} == {"off"}
    assert {p.settings.eventbus.capacity for p in plans} == {64}  # the rest passes through
    grouped = Settings.model_validate({"mqtt": {"shared_group": "g"}})
    assert worker_overrides(grouped, 1)["FLUX_MQTT__SHARED_GROUP"] == '"g"'
    with pytest.raises(ConfigError, match="worker 1 of 2"):
        plan_workers(
            Settings.model_validate({"server": {"port": 65535}}), 2, config_path=None, environ={}
        )


STAND_IN = """
import os, signal, sys, time
index = os.environ["FLUX_WORKER_INDEX"]
log = sys.argv[1]
with open(log, "a") as f:
    f.write(index + "\\n")
starts = open(log).read().split().count(index)
if index == "1":
    sys.exit(1 if starts < 3 else 2)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
time.sleep(60)
"""


async def test_a_crashing_worker_is_restarted_and_a_config_error_stops_all(
    tmp_path: Path,
) -> None:
    """Worker 1 exits 1 twice (restarted each time), then 2: everything stops, exit code 2."""
    log = tmp_path / "starts"
    plans = plan_workers(Settings(), 2, config_path=None, environ={})
    supervisor = Supervisor(
        plans,
        argv=[sys.executable, "-c", STAND_IN, str(log)],
        environ=clean_env(),
        stop_timeout_s=10,
        first_delay_s=0.05,
    )
    code = await asyncio.wait_for(supervisor.run(handle_signals=False), 30)
    assert code == 2
    assert log.read_text().split().count("1") == 3
    assert log.read_text().split().count("0") == 1  # the healthy one was stopped, not restarted
    assert supervisor.pids == []


async def test_stop_forwards_the_signal_and_exits_zero(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    plans = plan_workers(Settings(), 2, config_path=None, environ={})
    argv = [sys.executable, "-c", STAND_IN.replace('index == "1"', "False"), str(log)]
    supervisor = Supervisor(plans, argv=argv, environ=clean_env(), stop_timeout_s=10)
    running = asyncio.create_task(supervisor.run(handle_signals=False))
    await wait_until(lambda: log.exists() and len(log.read_text().split()) == 2, what="2 workers")
    await wait_until(lambda: len(supervisor.pids) == 2, what="2 pids")
    supervisor.request_stop(signal.SIGTERM)
    assert await asyncio.wait_for(running, 20) == 0
    assert supervisor.pids == []
