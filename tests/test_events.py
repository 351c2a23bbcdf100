from __future__ import annotations

import os

import pytest

from flux.events import DeadLetter, Event, device_id_for, make_event, new_event_id


def test_device_id_comes_from_the_topic_then_the_payload() -> None:
    assert device_id_for("devices/dev-1/telemetry", {}) == "dev-1"
    assert device_id_for("devices/dev-1", {}) == "dev-1"
    assert device_id_for("sensors/x", {"device_id": "abc"}) == "abc"
    assert device_id_for("sensors/x", {"device_id": 42}) == "42"
    assert device_id_for("devices//x", {"device_id": "p"}) == "p"
    assert device_id_for("sensors/x", {"device_id": True}) is None
    assert device_id_for("sensors/x", {}) is None


def test_ids_sort_by_creation_and_are_unique() -> None:
    ids = [new_event_id() for _ in range(10_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(len(value) == 32 for value in ids)


def test_a_forked_process_draws_its_own_id_prefix() -> None:
    """Workers forked from one gateway must not share the random part of the ids."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, new_event_id().encode())
        os._exit(0)
    os.close(write)
    child_id = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent_id = new_event_id()
    assert len(child_id) == 32
    assert child_id[12:20] != parent_id[12:20], "the 32-bit process prefix"


def test_a_valid_message_becomes_an_event() -> None:
    event = make_event("devices/d/telemetry", b'{"t": 1.5}', max_bytes=100, source="mqtt", qos=1)
    assert isinstance(event, Event)
    assert event.payload == {"t": 1.5}
    assert event.device_id == "d"
    assert event.qos == 1
    assert not event.needs_ack


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe{}", "invalid_utf8"),
        (b'{"a": "\xed\xa0\x80"}', "invalid_utf8"),
        (b"not json", "invalid_json"),
        (b'{"a": NaN}', "invalid_json"),
        (b'{"a": 1', "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"text"', "not_an_object"),
        (b"42", "not_an_object"),
        (b"null", "not_an_object"),
        (b'{"x": "' + b"a" * 200 + b'"}', "too_large"),
    ],
)
def test_bad_payloads_become_dead_letters_with_a_reason(raw: bytes, reason: str) -> None:
    letter = make_event("devices/d/telemetry", raw, max_bytes=128, source="mqtt")
    assert isinstance(letter, DeadLetter)
    assert letter.reason == reason
    assert letter.raw == raw
    assert letter.detail


def test_deep_nesting_is_refused_not_recursed() -> None:
    raw = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    letter = make_event("devices/d/telemetry", raw, max_bytes=1 << 20, source="mqtt")
    assert isinstance(letter, DeadLetter)
    assert letter.reason == "invalid_json"
    assert "depth" in letter.detail


def test_an_overlong_topic_is_a_dead_letter() -> None:
    letter = make_event("a" * 70_000, b"{}", max_bytes=128, source="mqtt")
    assert isinstance(letter, DeadLetter)
    assert letter.reason == "topic_too_long"
    assert len(letter.topic) == 1024
