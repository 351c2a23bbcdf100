"""Fixtures for the rules tests: a running engine, events and the shipped rules (real Lua)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from flux.events import Event, device_id_for, new_event_id
from flux.rules import Rule, RuleEngine, load_rules_path

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"

MakeEvent = Callable[..., Event]


def make_event(
    payload: dict[str, Any],
    topic: str = "devices/dev-1/telemetry",
    *,
    received_at: float | None = None,
    hops: int = 0,
) -> Event:
    """Build an event the way ingest would."""
    return Event(
        id=new_event_id(),
        topic=topic,
        device_id=device_id_for(topic, payload),
        payload=payload,
        raw=orjson.dumps(payload),
        received_at=time.time() if received_at is None else received_at,
        source="mqtt",
        hops=hops,
    )


def metric(name: str, **labels: str) -> float:
    """Return a sample of the default registry (0 when the series does not exist)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def event() -> MakeEvent:
    return make_event


@pytest.fixture
async def engine() -> AsyncIterator[RuleEngine]:
    async with RuleEngine(quarantine_after=3, instruction_budget=200_000) as running:
        yield running


@pytest.fixture(scope="session")
def shipped_rules() -> dict[str, Rule]:
    report = load_rules_path(RULES_DIR)
    assert report.ok, report.to_dict()
    return {rule.id: rule for rule in report.rules}
