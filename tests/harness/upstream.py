"""An upstream broker for the sink tests: a private Mosquitto with TLS and a password, and a
subscriber that records what arrives there (MQTT 5, with the event id property). The
``upstream`` fixture (``tests/conftest.py``) makes one per test."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
import trustme
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.harness.brokers import PrivateMosquitto
from tests.harness.tools import mosquitto_available
from tests.harness.waiting import unique

USER, PASSWORD = "site-7", "upstream-secret"


@dataclass
class Upstream:
    """A private upstream broker; ``stop``/``start`` keep its port and its sessions."""

    broker: PrivateMosquitto
    ca_file: Path

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.broker.port}"

    def sink(self, **extra: Any) -> dict[str, Any]:
        """A ``[sinks.<name>]`` section for this broker."""
        return {
            "type": "mqtt",
            "url": self.url,
            "username": USER,
            "password": PASSWORD,
            "tls_ca_file": str(self.ca_file),
            "retry_max_delay_s": 1.0,
            **extra,
        }


def upstream_broker(tmp_path: Path) -> Iterator[Upstream]:
    """Start a private upstream broker with its own CA; stop it when done."""
    if not mosquitto_available():
        pytest.skip("mosquitto is not on PATH; the sink tests need a private upstream broker")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key, ca_file = tmp_path / "up.pem", tmp_path / "up.key", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    broker = PrivateMosquitto(users={USER: PASSWORD}, tls=(chain, key))
    broker.start()
    try:
        yield Upstream(broker, ca_file)
    finally:
        broker.cleanup()


class UpstreamListener:
    """A persistent MQTT 5 session on the upstream broker, subscribed QoS 1 to ``filter``,
    recording (topic, payload, flux-event-id) in arrival order; it reconnects by itself and
    the broker queues for it while it is away."""

    def __init__(self, upstream: Upstream, topic_filter: str) -> None:
        self.messages: list[tuple[str, Any, str | None]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=unique("up-listen-"), protocol=paho.MQTTv5
        )
        self.client.username_pw_set(USER, PASSWORD)
        self.client.tls_set_context(ssl.create_default_context(cafile=str(upstream.ca_file)))
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600
        self.client.connect(
            "localhost", upstream.broker.port, clean_start=False, properties=properties
        )
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("the upstream listener is not subscribed")

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        event_id = None
        for key, value in getattr(message.properties, "UserProperty", None) or []:
            if key == "flux-event-id":
                event_id = value
        with self._lock:
            self.messages.append((message.topic, orjson.loads(message.payload), event_id))

    def received(self) -> list[tuple[str, Any, str | None]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def first_arrivals_in_order(messages: list[tuple[str, Any, str | None]]) -> dict[str, list[int]]:
    """Per device (topic level 2), the ``seq`` of each first arrival, in arrival order."""
    seen: set[tuple[str, int]] = set()
    order: dict[str, list[int]] = {}
    for topic, payload, _ in messages:
        device = topic.split("/")[-2]
        key = (device, payload["seq"])
        if key not in seen:
            seen.add(key)
            order.setdefault(device, []).append(payload["seq"])
    return order
