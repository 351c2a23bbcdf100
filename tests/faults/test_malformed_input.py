"""Scenario 5: malformed input, fuzzed with Hypothesis, through the decoder and a gateway.

Pass: the decoder never raises for any topic and any bytes; every malformed message sent
to a running gateway becomes exactly one dead letter carrying the expected reason and the
raw bytes, and the good messages interleaved with them are all stored (the pipeline goes
on). Categories: invalid UTF-8, JSON that is not an object, nesting deeper than the
decoder's limit, NaN/Infinity, oversize payloads and huge strings, topics past 1024
characters (up to 64 KiB), and arbitrary bytes.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from flux.events import (
    MAX_TOPIC_LENGTH,
    REASON_INVALID_JSON,
    REASON_INVALID_UTF8,
    REASON_NOT_AN_OBJECT,
    REASON_TOO_DEEP,
    REASON_TOO_LARGE,
    REASON_TOPIC_TOO_LONG,
    DeadLetter,
    Event,
    decode_payload,
    make_event,
)
from flux.metrics import SUBSCRIBER_ERRORS
from tests.harness import (
    Db,
    PrivateMosquitto,
    SeqDevice,
    make_settings,
    unique,
    wait_subscribed,
    wait_until,
)

MAX_BYTES = 65_536  # room for 10k-deep nesting below the size limit
REASONS = {
    REASON_INVALID_JSON,
    REASON_INVALID_UTF8,
    REASON_NOT_AN_OBJECT,
    REASON_TOO_DEEP,
    REASON_TOO_LARGE,
    REASON_TOPIC_TOO_LONG,
}
BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]

# -- strategies: (topic suffix or None, raw bytes, expected reason) ---------------------------

invalid_utf8 = st.builds(
    lambda head, bad, tail: (None, b'{"s": "' + head.encode() + bad + tail.encode() + b'"}'),
    st.text(max_size=20).filter(lambda s: '"' not in s and "\\" not in s),
    st.sampled_from(BAD_UTF8),
    st.text(max_size=20).filter(lambda s: '"' not in s and "\\" not in s),
).map(lambda t: (*t, REASON_INVALID_UTF8))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4),
    max_leaves=10,
)
not_an_object = json_values.map(lambda v: (None, orjson.dumps(v), REASON_NOT_AN_OBJECT))

too_deep = st.tuples(st.integers(1025, 10_000), st.sampled_from(["list", "object"])).map(
    lambda t: (
        None,
        (b"[" * t[0] + b"]" * t[0]) if t[1] == "list" else (b'{"a":' * t[0] + b"1" + b"}" * t[0]),
        REASON_INVALID_JSON,
    )
)

not_a_number = st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"]).map(
    lambda v: (None, b'{"v": ' + v + b"}", REASON_INVALID_JSON)
)

oversize = st.integers(MAX_BYTES + 1, 3 * MAX_BYTES).map(
    lambda n: (None, orjson.dumps({"s": "x" * n}), REASON_TOO_LARGE)
)

long_topic = st.integers(MAX_TOPIC_LENGTH + 1, 65_000).map(
    lambda n: ("t" * n, b'{"seq_in_topic": 1}', REASON_TOPIC_TOO_LONG)
)

MALFORMED = st.one_of(invalid_utf8, not_an_object, too_deep, not_a_number, oversize, long_topic)


# -- the decoder alone ------------------------------------------------------------------------


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(topic=st.text(max_size=2000), raw=st.binary(max_size=6000))
def test_make_event_never_raises(topic: str, raw: bytes) -> None:
    item = make_event(topic, raw, max_bytes=MAX_BYTES, source="mqtt", qos=1)
    if isinstance(item, DeadLetter):
        assert item.reason in REASONS and item.detail
    else:
        assert isinstance(item.payload, dict)


@settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(MALFORMED)
def test_each_malformed_category_gets_its_reason(case: tuple[str | None, bytes, str]) -> None:
    suffix, raw, reason = case
    topic = f"devices/dev/{suffix}" if suffix else "devices/dev/telemetry"
    item = make_event(topic, raw, max_bytes=MAX_BYTES, source="mqtt", qos=1)
    assert isinstance(item, DeadLetter), f"accepted as an event: {raw[:80]!r}"
    assert item.reason == reason, (item.reason, item.detail)


@settings(max_examples=20, derandomize=True, database=None)
@given(st.integers(2**64, 2**80) | st.integers(-(2**80), -(2**63) - 1))
def test_integers_beyond_64_bits_are_read_as_floats(value: int) -> None:
    """Documented in decode_payload: such integers keep their magnitude, not their digits."""
    raw = b'{"v": ' + str(value).encode() + b"}"
    payload = decode_payload(raw, max_bytes=MAX_BYTES)
    assert isinstance(payload["v"], float)
    assert payload["v"] == pytest.approx(value, rel=1e-15)


# -- through a running gateway -----------------------------------------------------------------


def _draw(strategy: Any, count: int) -> list[Any]:
    """Draw ``count`` deterministic examples of ``strategy`` (Hypothesis, no shrinking)."""
    drawn: list[Any] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn[:count]


@pytest.mark.slow
async def test_malformed_messages_become_dead_letters_and_the_pipeline_goes_on(
    tmp_path: Path, mosquitto: PrivateMosquitto, start_gateway: Any
) -> None:
    dev = unique("dev")
    good_topic = f"devices/{dev}/telemetry"
    cases: list[tuple[str | None, bytes, str]] = _draw(MALFORMED, 120)
    # A JSON object orjson reads (up to 1024 levels) but cannot write again (over 254):
    # refused at ingest, so it never reaches a stage that would have to serialize it.
    deep = b'{"a":' * 300 + b"1" + b"}" * 300
    cases.append((None, deep, REASON_TOO_DEEP))
    arbitrary = _draw(st.binary(max_size=300), 60)
    for raw in arbitrary:
        item = make_event(good_topic, raw, max_bytes=MAX_BYTES, source="mqtt")
        if isinstance(item, DeadLetter):
            cases.append((None, raw, item.reason))
    assert {reason for _, _, reason in cases} >= REASONS

    settings_ = make_settings(
        tmp_path,
        ("127.0.0.1", mosquitto.port),
        device_ids=[dev],
        mqtt={"max_payload_bytes": MAX_BYTES},
        database={"batch_size": 50},
    )
    db = Db(settings_.database.url)
    sim = SeqDevice("127.0.0.1", mosquitto.port)
    errors_before = SUBSCRIBER_ERRORS.labels(subscriber="store")._value.get()
    try:
        async with start_gateway(settings_) as gateway:
            await wait_subscribed(sim, db, dev)

            def send() -> None:
                for seq, (suffix, raw, _) in enumerate(cases):
                    topic = f"devices/{dev}/{suffix}" if suffix else good_topic
                    sim.client.publish(topic, raw, qos=1)
                    sim.publish_seq(good_topic, range(seq, seq + 1))

            await asyncio.to_thread(send)
            await wait_until(sim.all_acked, timeout=60, what="broker PUBACKs")
            await wait_until(
                lambda: db.has_all(good_topic, len(cases)), timeout=60, what="good stored"
            )
            await wait_until(
                lambda: _dead_letter_count(db, len(cases)), timeout=60, what="dead letters"
            )
            letters = await db.dead_letters()
            assert gateway.readiness()["mqtt"] and gateway.readiness()["database"]
        tally = await db.tally(good_topic, len(cases))
        expected = Counter(
            (reason, raw if reason != REASON_TOPIC_TOO_LONG else raw[:MAX_BYTES])
            for _, raw, reason in cases
        )
        got = Counter((row["reason"], bytes(row["payload"])) for row in letters)
        by_reason = Counter(reason for reason, _ in got.elements())
        print(
            f"\n[malformed] {len(cases)} malformed messages -> {len(letters)} dead letters "
            f"{dict(by_reason)}; good interleaved: {tally.describe()}"
        )
        assert got == expected, f"dead letters: missing {expected - got}, extra {got - expected}"
        assert all(row["detail"] for row in letters), "every dead letter says why"
        assert not tally.missing and tally.duplicates == 0, tally.describe()
        assert SUBSCRIBER_ERRORS.labels(subscriber="store")._value.get() == errors_before
    finally:
        sim.close()
        await db.close()


async def _dead_letter_count(db: Db, n: int) -> bool:
    return len(await db.dead_letters()) >= n


def test_events_accepted_by_the_decoder_are_plain_json() -> None:
    """What becomes an event survives the store's serializer, except the too-deep case."""
    shallow = make_event(
        "devices/d/t", b'{"a": {"b": [1, 2.5, "x", null]}}', max_bytes=MAX_BYTES, source="mqtt"
    )
    assert isinstance(shallow, Event)
    assert orjson.loads(orjson.dumps(shallow.payload)) == shallow.payload
