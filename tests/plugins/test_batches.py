"""Batches as the pipeline hands them: every shipped plugin at every batch size, ``enrich``'s
``on_batch`` against its ``on_msg``, and one bad event isolated from the rest of its batch."""

from __future__ import annotations

import functools
import math
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux.events import Event
from flux.plugins import PluginManager, PluginRejected, PluginTrap
from flux.plugins.instance import PluginInstance
from flux.plugins.manager import encode_batch
from flux.plugins.manifest import load_manifest
from flux.plugins.runtime import ModuleCache, PluginRuntime
from tests.harness import fleet, fleet_messages
from tests.plugins.conftest import SHIPPED
from tests.plugins.helpers import event, module, write_plugin

#: The pipeline's batches hold at most this many events per plugin call.
MAX_BATCH = 256
DEVICES = 200


def fleet_events(count: int) -> list[Event]:
    """``count`` telemetry events from a fleet of ``DEVICES`` sensors, as ingest makes them."""
    devices = fleet(DEVICES, math.ceil(count / DEVICES))
    messages = fleet_messages(devices, math.ceil(count / DEVICES))[:count]
    return [event(topic, payload) for topic, payload in messages]


def frame_events(count: int) -> list[Event]:
    """``count`` 7-byte sensor frames on ``devices/<id>/raw``."""
    return [
        event(
            f"devices/sensor-{i % DEVICES:04d}/raw",
            payload={},
            raw=struct.pack(">BhBHB", 1, 2000 + i, 40 + i % 50, 3000, i % 256),
        )
        for i in range(count)
    ]


def js_round3(value: float) -> float:
    """Round to 3 decimals as the plugin does (JavaScript's Math.round: half up)."""
    return math.floor(value * 1000 + 0.5) / 1000


def expected_stats(events: list[Event]) -> dict[str, dict[str, Any]]:
    """batch-stats' summary per device, computed here."""
    devices: dict[str, dict[str, Any]] = {}
    for e in events:
        entry = devices.setdefault(str(e.device_id), {"count": 0, "fields": {}})
        entry["count"] += 1
        for key, value in e.payload.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            entry["fields"].setdefault(key, []).append(float(value))
    return {
        device: {
            "device_id": device,
            "count": entry["count"],
            "fields": {
                key: {
                    "count": len(values),
                    "min": js_round3(min(values)),
                    "max": js_round3(max(values)),
                    "mean": js_round3(sum(values) / len(values)),
                    "last": js_round3(values[-1]),
                }
                for key, values in entry["fields"].items()
            },
        }
        for device, entry in devices.items()
    }


def shape(outputs: list[Event]) -> list[tuple[str, str | None, int, dict[str, Any]]]:
    return [(e.topic, e.device_id, e.hops, e.payload) for e in outputs]


def test_the_pipeline_never_hands_a_plugin_more_than_max_batch() -> None:
    for name in ("enrich", "batch-stats"):
        assert load_manifest(SHIPPED / name).limits.max_batch == MAX_BATCH


async def test_batch_stats_summarises_every_batch_size(shipped: PluginManager) -> None:
    for size in range(1, MAX_BATCH + 1):
        events = fleet_events(size)
        outcome = await shipped.call_batch("batch-stats", events)
        assert outcome.failed == [], f"batch of {size}: {outcome.failed[:1]}"
        got = {e.device_id: e for e in outcome.outputs}
        assert len(got) == len(outcome.outputs) == min(size, DEVICES)
        expected = expected_stats(events)
        assert set(got) == set(expected)
        for device, summary in expected.items():
            out = got[device]
            assert out.topic == f"devices/{device}/stats" and out.hops == 1
            assert out.payload["count"] == summary["count"]
            for key, stats in summary["fields"].items():
                assert out.payload["fields"][key] == pytest.approx(stats, abs=1e-9), (size, key)
    assert shipped.stats("batch-stats").total_executions == MAX_BATCH


async def test_enrich_batches_of_every_size_match_its_per_message_outputs(
    shipped: PluginManager,
) -> None:
    events = fleet_events(MAX_BATCH)
    singles = [await shipped.call("enrich", e) for e in events]
    for size in range(1, MAX_BATCH + 1):
        outcome = await shipped.call_batch("enrich", events[:size])
        assert outcome.failed == []
        assert shape(outcome.outputs) == shape([o for outs in singles[:size] for o in outs])
    assert all(len(outs) == 1 for outs in singles)  # every fleet reading has a temperature


async def test_frame_decoder_without_on_batch_decodes_every_batch_size(
    shipped: PluginManager,
) -> None:
    frames = frame_events(MAX_BATCH)
    singles = [await shipped.call("frame-decoder", e) for e in frames]
    for size in (1, 2, 7, 64, 255, MAX_BATCH):
        outcome = await shipped.call_batch("frame-decoder", frames[:size])
        assert outcome.failed == []
        assert shape(outcome.outputs) == shape([o for outs in singles[:size] for o in outs])


async def test_a_batch_larger_than_max_batch_is_split(shipped: PluginManager) -> None:
    events = fleet_events(3 * MAX_BATCH + 5)
    outcome = await shipped.call_batch("enrich", events)
    assert outcome.failed == [] and len(outcome.outputs) == len(events)
    assert shipped.stats("enrich").total_executions == 4


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


#: Payloads enrich treats differently: no temperature, out of range, escapes, non-ASCII,
#: nested values, and one nested deeper than its parser takes (rejected on its own).
EDGE_PAYLOADS: list[dict[str, Any]] = [
    {},
    {"pressure": 1000},
    {"temperature": "20"},
    {"temperature": 120},
    {"temperature": 20, "humidity": 140},
    {"temperature": 31.5, "humidity": 70, "x": [1, {}]},
    {"name": "Zürich ☃", "temperature": 3.25e1, "humidity": 0},
    {"note": 'a "quoted" \\ backslash\n', "temperature": -41, "humidity": 10},
    {"temperature": 20, "deep": nested(100)},
    {"temperature": 21, "humidity": 50, "nested": {"a": {"b": [True, None, -1.5e-3]}}},
]


async def test_enrich_batch_refuses_only_the_event_on_msg_refuses(
    shipped: PluginManager,
) -> None:
    events = [event("devices/edge/telemetry", payload) for payload in EDGE_PAYLOADS]
    events[4:4] = fleet_events(5)
    expected: list[Event] = []
    refused: list[Event] = []
    for e in events:
        try:
            expected.extend(await shipped.call("enrich", e))
        except PluginRejected:
            refused.append(e)
    assert [e.payload for e in refused] == [EDGE_PAYLOADS[8]]
    outcome = await shipped.call_batch("enrich", events)
    assert shape(outcome.outputs) == shape(expected)
    [(event_refused, error)] = outcome.failed
    assert event_refused is refused[0]
    assert isinstance(error, PluginRejected) and "nests too deeply" in error.message
    assert shipped.stats("enrich").restart_count == 0  # refusing is not a fault


@functools.cache
def enrich_instance() -> PluginInstance:
    """One enrich instance for the hypothesis examples (no event loop needed)."""
    manifest = load_manifest(SHIPPED / "enrich")
    return PluginInstance(PluginRuntime(manifest=manifest, cache=ModuleCache(None)), instance_id=1)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(-1e6, 1e6) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
payloads = st.dictionaries(
    st.sampled_from(["temperature", "humidity", "battery", "note", "x"]) | st.text(max_size=6),
    st.floats(-60, 130) | json_values,
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(payloads, min_size=1, max_size=12))
def test_enrich_on_batch_equals_on_msg_for_any_payloads(batch: list[dict[str, Any]]) -> None:
    instance = enrich_instance()
    manifest = instance.runtime.manifest
    events = [event("devices/h/telemetry", payload) for payload in batch]
    expected = []
    for position, e in enumerate(events):
        for output in instance.call(orjson.dumps(e.payload)):
            expected.append((position, output.payload))
    outputs = instance.call(encode_batch(manifest, events), batch=True, count=len(events))
    assert instance.rejected == []
    assert [(o.parent, o.payload) for o in outputs] == expected


#: on_batch that traps when its input holds a "!" and returns no output otherwise.
TRAP_ON_BANG = module(
    """
  (func (export "on_batch") (param $p i32) (param $n i32) (result i64) (local $i i32)
    (block $done
      (loop $scan
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (if (i32.eq (i32.load8_u (i32.add (local.get $p) (local.get $i))) (i32.const 33))
          (then unreachable))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $scan)))
    (i64.const 0))
"""
)


async def test_one_trapping_event_does_not_fail_the_rest_of_its_batch(
    plugins_dir: Path, cache_dir: Path
) -> None:
    write_plugin(
        plugins_dir,
        "picky",
        TRAP_ON_BANG,
        manifest='[exports]\non_msg = ""\non_batch = "on_batch"\n',
    )
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        events = [event("test/d", {"n": i}) for i in range(100)]
        poisoned = [events[17], events[80]]
        for e in poisoned:
            e.payload["text"] = "poison!"
        outcome = await manager.call_batch("picky", events)
        assert [e for e, _ in outcome.failed] == poisoned
        assert all(isinstance(error, PluginTrap) for _, error in outcome.failed)
        stats = manager.stats("picky")
        assert stats.traps >= 2 and stats.size <= stats.max_size


def deep_output_module(depth: int) -> str:
    """on_batch returning one output whose payload nests ``depth`` arrays (orjson reads up
    to 1024 levels but writes only 254, and a derived event is written again)."""
    text = '[{"payload":{"deep":' + "[" * depth + "]" * depth + "}}]"
    escaped = text.replace('"', '\\"')
    return module(
        f"""
  (data (i32.const 16) "{escaped}")
  (func (export "on_batch") (param $p i32) (param $n i32) (result i64)
    (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const {len(text)})))
"""
    )


async def test_an_output_too_deep_to_store_fails_only_its_events(
    plugins_dir: Path, cache_dir: Path
) -> None:
    write_plugin(
        plugins_dir,
        "deep",
        deep_output_module(300),
        manifest='[exports]\non_msg = ""\non_batch = "on_batch"\n',
        extra_top='output_topic = "out/{device_id}"',
    )
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        events = [event("test/d", {"n": i}) for i in range(4)]
        outcome = await manager.call_batch("deep", events)
        assert outcome.outputs == []
        assert [e for e, _ in outcome.failed] == events
        assert all("cannot be written as JSON" in error.message for _, error in outcome.failed)
