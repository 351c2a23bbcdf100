"""Simulated devices: telemetry, a drifting sensor fleet, paho publishers and listeners."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.harness.waiting import unique

T = TypeVar("T")


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


class Subscriber(Generic[T]):
    """A paho client subscribed (QoS 1) to topic filters, keeping ``record(message)`` of
    every message in arrival order; it subscribes again after a reconnect."""

    def __init__(
        self,
        broker: tuple[str, int],
        *filters: str,
        record: Callable[[Any], T],
        protocol: MQTTProtocolVersion = paho.MQTTv311,
    ) -> None:
        self.messages: list[T] = []
        self._record = record
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=unique("listen-"), protocol=protocol
        )
        self.client.on_connect = lambda c, *_: c.subscribe([(f, 1) for f in filters])
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(*broker)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("listener not subscribed")

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        recorded = self._record(message)
        with self._lock:
            self.messages.append(recorded)

    def received(self) -> list[T]:
        """What arrived so far, in order."""
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Listener(Subscriber[tuple[str, Any]]):
    """A ``Subscriber`` collecting what the gateway publishes as (topic, decoded JSON
    payload)."""

    def __init__(self, broker: tuple[str, int], *filters: str) -> None:
        super().__init__(
            broker, *filters, record=lambda message: (message.topic, orjson.loads(message.payload))
        )


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


class SeqDevice:
    """A paho device with a persistent session that numbers its messages and tracks PUBACKs.

    ``clean_session=False`` and a fixed client id: after a broker restart paho reconnects on
    its own and republishes every QoS 1 message it holds no PUBACK for. A message published
    while disconnected stays queued in paho and goes out on the reconnect.
    """

    def __init__(self, host: str, port: int, *, client_id: str | None = None) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"seqdev-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv311,
            clean_session=False,
        )
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._lock = threading.Lock()
        self._seq_by_mid: dict[int, int] = {}
        self._early: set[int] = set()
        self.acked: set[int] = set()
        self.sent = 0
        self.connects = 0
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        if not self.connected.wait(10):
            self.client.loop_stop()
            raise TimeoutError("the device simulator could not connect")

    def _on_connect(self, *args: Any) -> None:
        self.connects += 1
        self.connected.set()

    def _on_disconnect(self, *args: Any) -> None:
        self.connected.clear()

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, *args: Any) -> None:
        with self._lock:
            seq = self._seq_by_mid.pop(mid, None)
            if seq is None:
                self._early.add(mid)  # acknowledged before publish() returned its mid
            else:
                self.acked.add(seq)

    def publish_seq(
        self, topic: str, seqs: range, *, qos: int = 1, pad: int = 0, pace_every: int = 0
    ) -> None:
        """Publish ``{"seq": n}`` for each n; ``pace_every`` yields the GIL every n messages."""
        filler = "x" * pad
        for seq in seqs:
            payload = orjson.dumps({"seq": seq, "pad": filler} if pad else {"seq": seq})
            # Not under self._lock: paho calls on_publish holding its own message lock.
            info = self.client.publish(topic, payload, qos=qos)
            if qos:
                with self._lock:
                    if info.mid in self._early:
                        self._early.discard(info.mid)
                        self.acked.add(seq)
                    else:
                        self._seq_by_mid[info.mid] = seq
            self.sent += 1
            if pace_every and seq % pace_every == 0:
                time.sleep(0.001)  # pacing a stream, not synchronising

    def unacked(self) -> int:
        with self._lock:
            return len(self._seq_by_mid)

    def all_acked(self) -> bool:
        return self.unacked() == 0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
