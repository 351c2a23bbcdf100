"""Helpers the tests share: real brokers, databases, a paho device simulator, waiting."""

from __future__ import annotations

import asyncio
import os
import pwd
import random
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port, 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], *, timeout: float = 20.0, what: str = ""
) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.02)


class PrivateMosquitto:
    """A Mosquitto of the test's own on a free port; stoppable and restartable."""

    def __init__(
        self,
        *,
        port: int | None = None,
        persistent: bool = True,
        max_inflight: int = 0,
        as_embedded: bool = False,
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="flux-mosq-"))
        self.persistent = persistent
        #: Mosquitto's max_inflight_messages, also the Receive Maximum it announces (0: its
        #: default, 20).
        self.max_inflight = max_inflight
        #: Run with the configuration flux gives its embedded Mosquitto (what ships).
        self.as_embedded = as_embedded
        #: Only these users (name -> password) may connect; None: anyone, anonymously.
        self.users = users
        #: (certificate chain, key) files: the listener speaks TLS (mqtts://).
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = self.dir / "mosquitto.conf"
        if self.as_embedded:
            from flux.ingest.broker import mosquitto_config

            config.write_text(
                mosquitto_config(
                    host="127.0.0.1", port=self.port, data_dir=self.dir, max_payload_bytes=262144
                )
            )
        else:
            # Our own user: started by root, Mosquitto would switch to "mosquitto", which
            # cannot read files in this private folder.
            lines = [
                f"user {pwd.getpwuid(os.getuid()).pw_name}",
                f"listener {self.port} 127.0.0.1",
                "max_queued_messages 100000",
            ]
            if self.tls is not None:
                lines += [f"certfile {self.tls[0]}", f"keyfile {self.tls[1]}"]
            if self.users is None:
                lines.append("allow_anonymous true")
            else:
                lines += ["allow_anonymous false", f"password_file {self._password_file()}"]
            if self.max_inflight:
                lines.append(f"max_inflight_messages {self.max_inflight}")
            if self.persistent:
                lines += ["persistence true", f"persistence_location {self.dir}/"]
            config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port("127.0.0.1", self.port)

    def _password_file(self) -> Path:
        path = self.dir / "passwords"
        path.touch(mode=0o600)
        for user, password in (self.users or {}).items():
            subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True)
        return path

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@asynccontextmanager
async def sqlite_write_lock(path: Path) -> AsyncIterator[None]:
    """Hold the database's write lock from another connection, as an external writer would:
    taken on a thread, so the gateway's event loop goes on while it waits for the lock."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
    await asyncio.to_thread(conn.execute, "BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def telemetry(seq: int) -> bytes:
    """A device's sample reading with a sequence number and the time it was sent."""
    return orjson.dumps(
        {
            "seq": seq,
            "temperature": 20 + seq % 15,
            "humidity": 40 + seq % 30,
            "battery": 3.7,
            "ts": time.time(),
        }
    )


class FleetDevice:
    """One simulated sensor of a fleet, as real ones report: slow drifts, not random noise.

    Its readings are deterministic (seeded by the fleet seed and the device index), so a test
    can tell which shipped rules each reading should trip. Every ``HOT_EVERY``-th device sits
    in warm, dry air (``overheat`` matches each reading), every ``LOW_BATTERY_EVERY``-th (from
    ``LOW_BATTERY_AT``) runs on a battery below 15 % (``battery-low``), every
    ``HEATING_EVERY``-th (from ``HEATING_AT``) warms up 0.25 degC per reading from 18 to 27
    degC (``temperature-rising-fast`` over its ``ts``); the rest match nothing. Each reading
    carries ``seq`` and the device's own clock ``ts`` (``interval_s`` apart, ending now).
    """

    HOT_EVERY = 12
    LOW_BATTERY_EVERY, LOW_BATTERY_AT = 50, 7
    HEATING_EVERY, HEATING_AT = 50, 23

    def __init__(self, index: int, *, seed: int, first_ts: float, interval_s: float) -> None:
        self.index = index
        self.device_id = f"sensor-{index:04d}"
        self.topic = f"devices/{self.device_id}/telemetry"
        self.rng = random.Random(seed * 1_000_003 + index)
        self.hot = index % self.HOT_EVERY == 0
        self.heating = index % self.HEATING_EVERY == self.HEATING_AT and not self.hot
        low = index % self.LOW_BATTERY_EVERY == self.LOW_BATTERY_AT
        self.temperature = self.rng.uniform(30.6, 32.0) if self.hot else self.rng.uniform(16, 26)
        if self.heating:
            self.temperature = 18.0
        self.humidity = self.rng.uniform(44, 54) if self.hot else self.rng.uniform(40, 75)
        self.battery = 14.0 if low else self.rng.uniform(30, 100)
        self.seq = 0
        self.ts = first_ts + self.rng.uniform(0, interval_s)
        self.interval_s = interval_s

    def reading(self) -> dict[str, Any]:
        """The next reading (and advance the device's clock)."""
        rng = self.rng
        if self.heating and self.temperature < 27:
            self.temperature += 0.25
        else:
            low, high = (30.4, 33.0) if self.hot else (12.0, 28.5)
            self.temperature = min(high, max(low, self.temperature + rng.gauss(0, 0.03)))
        low, high = (40.0, 58.0) if self.hot else (30.0, 85.0)
        self.humidity = min(high, max(low, self.humidity + rng.gauss(0, 0.1)))
        self.battery = max(0.0, self.battery - 0.01)
        payload = {
            "seq": self.seq,
            "ts": round(self.ts, 3),
            "temperature": round(self.temperature, 1),
            "humidity": round(self.humidity, 1),
            "battery": round(self.battery, 1),
            "charging": False,
        }
        self.seq += 1
        self.ts += self.interval_s
        return payload


def fleet(
    devices: int, per_device: int, *, seed: int = 7, interval_s: float = 5.0
) -> list[FleetDevice]:
    """The devices of a fleet whose ``per_device`` readings end about now."""
    first_ts = time.time() - per_device * interval_s
    return [
        FleetDevice(i, seed=seed, first_ts=first_ts, interval_s=interval_s) for i in range(devices)
    ]


def fleet_messages(devices: list[FleetDevice], per_device: int) -> list[tuple[str, dict[str, Any]]]:
    """``per_device`` readings of every device, interleaved as a fleet sends them."""
    return [(d.topic, d.reading()) for _ in range(per_device) for d in devices]


def mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None


#: ``.ci/run`` sets this to 1: a test whose tool (promtool, Chromium) is missing then fails
#: instead of skipping, so CI cannot pass by not running it.
REQUIRE_TOOLS_ENV = "FLUX_REQUIRE_TOOLS"


def require_tool(name: str, *, install: str) -> str:
    """The path of the executable ``name``; without it skip the test, saying which Debian
    package ``install`` brings it, or fail when ``FLUX_REQUIRE_TOOLS=1``."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (Debian: apt-get install {install})"
    if os.environ.get(REQUIRE_TOOLS_ENV) == "1":
        pytest.fail(f"{message}; {REQUIRE_TOOLS_ENV}=1 requires it")
    pytest.skip(message)


class Listener:
    """A paho client subscribed (QoS 1) to topic filters, collecting what the gateway
    publishes as (topic, decoded JSON payload); it subscribes again after a reconnect."""

    def __init__(self, broker: tuple[str, int], *filters: str) -> None:
        self.messages: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=unique("listen-"))
        self.client.on_connect = lambda c, *_: c.subscribe([(f, 1) for f in filters])
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(*broker)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("listener not subscribed")

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append((message.topic, orjson.loads(message.payload)))

    def received(self) -> list[tuple[str, Any]]:
        """What arrived so far, in order."""
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Device:
    """A paho-mqtt device simulator: publishes and waits for the broker's PUBACKs."""

    def __init__(self, host: str, port: int, *, client_id: str | None = None) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"sim-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv311,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.connected = threading.Event()
        self.client.on_connect = lambda *args: self.connected.set()
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise TimeoutError("device simulator could not connect")

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos)

    def publish_all(
        self, messages: list[tuple[str, bytes | str]], qos: int = 1, timeout: float = 60.0
    ) -> None:
        infos = [self.publish(topic, payload, qos) for topic, payload in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError("the broker did not acknowledge every message")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def device(host: str, port: int) -> Iterator[Device]:
    sim = Device(host, port)
    try:
        yield sim
    finally:
        sim.close()


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


Json = dict[str, Any]
