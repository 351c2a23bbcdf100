"""One forwarded row's way: its topic from the sink's template, its PUBLISH as encoded for a
real Mosquitto, and the cost of both per row (pytest-benchmark, one round in CI; no timing
is asserted: ``pytest tests/sinks/test_forward_path.py --benchmark-enable``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from flux.config import MqttConfig, Settings
from flux.events import Event, make_event
from flux.ingest._gmqtt import MQTTv50, MQTTv311
from flux.sinks.manager import Sinks
from flux.sinks.mqtt import MqttSession, MqttTransport
from flux.sinks.rows import OutboxRow, TopicTemplate, new_row_id
from tests.harness import (
    PrivateMosquitto,
    Subscriber,
    mosquitto_available,
    unique,
    wait_until,
)

BATCH = 512


def _event(topic: str, seq: int = 0) -> Event:
    event = make_event(
        topic, b'{"temperature": 21.5, "seq": %d}' % seq, max_bytes=65536, source="mqtt"
    )
    assert isinstance(event, Event)
    return event


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{topic}", "devices/d1/telemetry"),
        ("site-7/{topic}/up", "site-7/devices/d1/telemetry/up"),
        ("fixed/topic", "fixed/topic"),
        ("{{site}}/{topic}", "{site}/devices/d1/telemetry"),
        ("{{fixed}}", "{fixed}"),
        ("{gateway}/{device_id}/{rule_id}/{topic}", "gw-1/d1/r1/devices/d1/telemetry"),
    ],
)
def test_topic_template_renders_an_events_row_topic(template: str, expected: str) -> None:
    event = _event("devices/d1/telemetry")
    assert TopicTemplate(template).render(event, gateway="gw-1", rule_id="r1") == expected


def test_topic_template_names_the_event_id() -> None:
    event = _event("devices/d1/telemetry")
    assert TopicTemplate("ids/{event_id}").render(event, gateway="gw") == f"ids/{event.id}"


#: What a subscriber keeps of a message: topic, payload, QoS and user properties.
Arrival = tuple[str, bytes, int, dict[str, str]]


def _arrival(message: Any) -> Arrival:
    properties = dict(getattr(message.properties, "UserProperty", None) or [])
    return (message.topic, message.payload, message.qos, properties)


def _session(broker: tuple[str, int], protocol: int) -> MqttSession:
    host, port = broker
    return MqttSession(
        name=unique("sink-"),
        config=MqttConfig(url=f"mqtt://{host}:{port}", client_id=unique("enc-"), embedded="off"),
        client_id=unique("enc-"),
        protocol=lambda: protocol,
        persistent=False,
    )


@pytest.mark.parametrize("protocol", [MQTTv50, MQTTv311], ids=["mqtt5", "mqtt311"])
async def test_rows_arrive_as_published_whatever_their_size_and_qos(
    broker: tuple[str, int], protocol: int
) -> None:
    """Payloads whose remaining length takes one, two and three bytes, QoS 0 and 1: each
    arrives with its topic, payload and QoS; under MQTT 5 with its hop count and event id."""
    prefix = unique("enc")
    rows = [
        OutboxRow(
            id=new_row_id(),
            sink="enc",
            topic=f"{prefix}/{size}/{qos}",
            payload=bytes(range(256)) * (size // 256) + b"x" * (size % 256),
            created_at=0.0,
            event_id=f"{size:016x}{qos:016x}",
            qos=qos,
            hops=size % 7,
        )
        for size in (5, 200, 20_000)
        for qos in (0, 1)
    ]
    subscriber = Subscriber(broker, f"{prefix}/#", record=_arrival, protocol=paho.MQTTv5)
    confirmed: list[OutboxRow] = []
    try:
        transport = MqttTransport(_session(broker, protocol), window=100, with_event_id=True)
        async with transport:
            await wait_until(lambda: transport.connected, what="the session connected")
            await transport.send(rows, confirmed.extend)
            await wait_until(lambda: len(confirmed) == len(rows), what="every row confirmed")
            await wait_until(
                lambda: len(subscriber.received()) == len(rows), what="every row delivered"
            )
        # QoS 0 rows are confirmed once written, QoS 1 rows on their PUBACK.
        assert sorted(row.id for row in confirmed) == sorted(row.id for row in rows)
        arrived = {
            topic: (payload, qos, props) for topic, payload, qos, props in subscriber.received()
        }
        for row in rows:
            payload, qos, properties = arrived[row.topic]
            assert payload == row.payload
            assert qos == row.qos
            if protocol == MQTTv50:
                assert properties == {"flux-hops": str(row.hops), "flux-event-id": row.event_id}
            else:
                assert properties == {}
    finally:
        subscriber.close()


def test_bench_route(benchmark: Any) -> None:
    """``Sinks.route`` on a batch where half the events match the sink's filter (telemetry
    forwarded, derived events not), 200 devices."""
    settings = Settings.model_validate(
        {
            "sinks": {
                "up": {
                    "type": "mqtt",
                    "url": "mqtt://127.0.0.1:1",
                    "topic": "site-7/{topic}",
                    "topics": ["devices/+/telemetry"],
                }
            }
        }
    )
    engine = create_async_engine("sqlite+aiosqlite:///:memory:")
    sinks = Sinks(
        settings=settings, engine=engine, delete=lambda ids: None, local_protocol=lambda: 5
    )
    batch = [
        _event(f"devices/d{i % 200}/{'telemetry' if i % 2 == 0 else 'enriched'}", i)
        for i in range(BATCH)
    ]
    rows = benchmark(sinks.route, batch)
    assert len(rows) == BATCH // 2
    assert rows[0].topic == "site-7/devices/d0/telemetry" and rows[0].event_id == batch[0].id
    benchmark.extra_info["rows_per_batch"] = len(rows)


@pytest.fixture(scope="module")
def wide_broker() -> Iterator[tuple[str, int]]:
    """A private Mosquitto with Receive Maximum 1,000, as a cloud broker allows: the rows
    are pipelined, so the benchmark measures the gateway's work rather than round trips."""
    if not mosquitto_available():
        pytest.skip("mosquitto is not on PATH")
    broker = PrivateMosquitto(persistent=False, max_inflight=1000)
    broker.start()
    try:
        yield ("127.0.0.1", broker.port)
    finally:
        broker.cleanup()


@pytest.mark.benchmark(timer=time.process_time)  # this process's CPU, not the round trips
def test_bench_publish_confirmed(benchmark: Any, wide_broker: tuple[str, int]) -> None:
    """``BATCH`` rows through a real session to Mosquitto, each confirmed by its PUBACK:
    encoding, writing, and taking the PUBACKs."""
    loop = asyncio.new_event_loop()
    try:
        session = _session(wide_broker, MQTTv50)
        transport = MqttTransport(session, window=BATCH, with_event_id=True)
        loop.run_until_complete(transport.__aenter__())
        rows = [
            OutboxRow(
                id=new_row_id(),
                sink="enc",
                topic=f"{unique('bench')}/devices/d{i % 200}/telemetry",
                payload=b'{"temperature": 21.5, "humidity": 40.2, "seq": %d}' % i,
                created_at=0.0,
                event_id=new_row_id(),
                hops=1,
            )
            for i in range(BATCH)
        ]

        async def publish_all() -> int:
            await wait_until(lambda: transport.connected, what="the session connected")
            done = asyncio.Event()
            confirmed: list[OutboxRow] = []

            def confirm(batch: list[OutboxRow]) -> None:
                confirmed.extend(batch)
                if len(confirmed) == len(rows):
                    done.set()

            await transport.send(rows, confirm)
            await asyncio.wait_for(done.wait(), 30)
            return len(confirmed)

        assert benchmark.pedantic(lambda: loop.run_until_complete(publish_all()), rounds=5) == BATCH
        benchmark.extra_info["rows_per_round"] = BATCH
        loop.run_until_complete(transport.__aexit__(None, None, None))
    finally:
        loop.close()
