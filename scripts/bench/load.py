"""The load: publisher processes, a device fleet, and a counter of what the gateway publishes."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from scripts.bench.sampling import SAMPLE_S
from tests.harness import fleet, fleet_messages, telemetry


def _publisher(port: int, device: str, count: int, qos: int, barrier: Any) -> None:
    """One device process: publish ``count`` sequence-numbered messages, wait until sent/acked."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{device}")
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    barrier.wait()
    topic = f"devices/{device}/telemetry"
    infos = []
    for seq in range(count):
        payload = telemetry(seq)
        infos.append(client.publish(topic, payload, qos=qos))
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def publish(port: int, total: int, publishers: int, qos: int) -> tuple[float, float, float]:
    """Publish ``total`` messages from ``publishers`` processes: (rate, started, finished).

    The processes are spawned, not forked: the bench has sampler threads by then.
    """
    per = total // publishers
    started, finished = run_publishers(
        _publisher, [(port, f"bench-{i}", per, qos) for i in range(publishers)]
    )
    return per * publishers / (finished - started), started, finished


def run_publishers(target: Callable[..., None], args: list[tuple[Any, ...]]) -> tuple[float, float]:
    """Run one spawned process per ``args`` (each gets a start barrier as its last argument),
    release them together, wait for them; return when they started and finished."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(args) + 1)
    processes = [context.Process(target=target, args=(*each, barrier)) for each in args]
    for process in processes:
        process.start()
    barrier.wait(120)
    started = time.perf_counter()
    for process in processes:
        process.join(300)
        if process.is_alive():
            process.kill()
    return started, time.perf_counter()


def _fleet_publisher(port: int, indexes: list[int], per_device: int, barrier: Any) -> None:
    """One publisher process: ``per_device`` readings of each fleet device in ``indexes``."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-fleet-{indexes[0]}")
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    devices = [d for d in fleet(max(indexes) + 1, per_device) if d.index in set(indexes)]
    messages = fleet_messages(devices, per_device)
    barrier.wait()
    infos = [client.publish(topic, orjson.dumps(body), qos=1) for topic, body in messages]
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def publish_fleet(port: int, devices: int, per_device: int, publishers: int) -> float:
    """Publish ``per_device`` QoS 1 readings of ``devices`` fleet devices; return msg/s."""
    publishers = min(publishers, devices)
    started, finished = run_publishers(
        _fleet_publisher,
        [(port, list(range(i, devices, publishers)), per_device) for i in range(publishers)],
    )
    return devices * per_device / (finished - started)


class PublishCounter:
    """Counts what the gateway publishes on a topic filter, and the distinct (device, seq)
    pairs among the messages, through ``mosquitto_sub`` (C, a process of its own: a Python
    subscriber took a good share of the 2 cores from the gateway it measured)."""

    PROBE = b'{"device": "bench-probe", "seq": -1}'

    def __init__(self, port: int, topic: str, *, by_topic: bool = False) -> None:
        self._port = port
        self._topic = topic
        #: Tell messages apart by (topic, seq) instead of the body's (device, seq).
        self._by_topic = by_topic
        self._seen: set[tuple[Any, Any]] = set()
        self._received = 0
        self.last_at = 0.0
        self._process: subprocess.Popen[bytes] | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> PublishCounter:
        command = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(self._port), "-q", "1"]
        output = "%t %p" if self._by_topic else "%p"
        command += ["-t", self._topic, "-F", output, "-i", f"bench-counter-{os.getpid()}"]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE)
        self._reader.start()
        # Subscribed once a probe published on the filter comes back.
        probe_topic = self._topic.replace("#", "bench-probe").replace("+", "bench-probe")
        probe_key: tuple[Any, Any] = (probe_topic, -1) if self._by_topic else ("bench-probe", -1)
        deadline = time.monotonic() + 30
        while probe_key not in self._seen:
            if time.monotonic() > deadline:
                raise RuntimeError("the publish counter did not subscribe within 30 s")
            subprocess.run(
                ["mosquitto_pub", "-p", str(self._port), "-t", probe_topic, "-m", self.PROBE],
                check=True,
            )
            time.sleep(0.2)
        self._seen.discard(probe_key)
        self._received = 0
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self._received += 1
            try:
                if self._by_topic:
                    topic, _, payload = line.partition(b" ")
                    key = (topic.decode(), orjson.loads(payload).get("seq"))
                else:
                    body = orjson.loads(line)
                    key = (body.get("device"), body.get("seq"))
            except (orjson.JSONDecodeError, AttributeError, UnicodeDecodeError):
                continue
            if key not in self._seen:
                self._seen.add(key)
                self.last_at = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
        self._reader.join(10)

    def received(self) -> int:
        return self._received

    def unique(self) -> int:
        return len(self._seen)

    def wait_for(self, total: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.unique() < total:
            if time.monotonic() > deadline or (self._process and self._process.poll() is not None):
                return False
            time.sleep(SAMPLE_S / 2)
        return True
