"""Fixtures of the fault suite: a private, persistent Mosquitto per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import PrivateMosquitto, mosquitto_available


@pytest.fixture
def mosquitto() -> Iterator[PrivateMosquitto]:
    """A Mosquitto of the test's own (persistence on) that the test may stop and restart."""
    if not mosquitto_available():
        pytest.skip("mosquitto is not on PATH; the fault suite needs a broker it can restart")
    broker = PrivateMosquitto(persistent=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.cleanup()
