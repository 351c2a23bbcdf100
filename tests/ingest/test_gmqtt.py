"""The PUBLISH fast path parses what gmqtt would, and leaves everything unusual to gmqtt."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from flux.ingest._gmqtt import parse_publish

PUBLISH = 0x30


def _packet(topic: bytes, payload: bytes, *, mid: int | None, properties: bytes | None) -> bytes:
    body = struct.pack("!H", len(topic)) + topic
    if mid is not None:
        body += struct.pack("!H", mid)
    if properties is not None:
        body += bytes([len(properties)]) + properties
    return body + payload


def _parse(cmd: int, packet: bytes, v5: bool) -> tuple[bool, list[tuple[Any, ...]]]:
    received: list[tuple[Any, ...]] = []
    handled = parse_publish(lambda *args: received.append(args), cmd, packet, v5)
    return handled, received


@pytest.mark.parametrize("v5", [True, False])
@pytest.mark.parametrize(("qos", "mid"), [(0, None), (1, 513), (2, 65535)])
def test_publish_without_properties_is_parsed(v5: bool, qos: int, mid: int | None) -> None:
    packet = _packet(b"devices/d\xc3\xa9/t", b'{"t": 1}', mid=mid, properties=b"" if v5 else None)
    handled, received = _parse(PUBLISH | qos << 1, packet, v5)
    assert handled
    assert received == [("devices/dé/t", b'{"t": 1}', qos, {}, mid)]


def test_properties_topic_aliases_and_broken_packets_go_to_gmqtt() -> None:
    user_property = b"\x26\x00\x09flux-hops\x00\x011"
    with_props = _packet(b"a/b", b"{}", mid=7, properties=user_property)
    assert _parse(PUBLISH | 2, with_props, True) == (False, [])
    alias = _packet(b"", b"{}", mid=7, properties=b"\x23\x00\x01")
    assert _parse(PUBLISH | 2, alias, True) == (False, [])
    assert _parse(PUBLISH | 2, b"\x00\x05ab", True) == (False, [])  # truncated topic+mid
    assert _parse(PUBLISH, _packet(b"\xff", b"{}", mid=None, properties=b""), True) == (False, [])
    assert _parse(PUBLISH, b"\x00\x09a/b", False) == (False, [])  # topic longer than packet
