"""ABI round trips through the three shipped plugins (C, Rust, AssemblyScript)."""

from __future__ import annotations

import functools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux.plugins import PluginManager, PluginRejected
from flux.plugins.instance import PluginInstance
from flux.plugins.manifest import load_manifest
from flux.plugins.runtime import ModuleCache, PluginRuntime
from tests.plugins.conftest import SHIPPED
from tests.plugins.helpers import event


def frame(
    temp_c100: int,
    humidity: int,
    battery: int,
    flags: int,
    pressure: int | None = None,
) -> bytes:
    if pressure is None:
        return struct.pack(">BhBHB", 1, temp_c100, humidity, battery, flags)
    return struct.pack(">BhBHBH", 2, temp_c100, humidity, battery, flags, pressure)


async def test_all_shipped_plugins_load(shipped: PluginManager) -> None:
    assert shipped.names() == {"frame-decoder", "enrich", "batch-stats"}
    assert shipped.load_errors == {}
    assert shipped.plugins_for("devices/abc/raw") == ("frame-decoder",)
    assert shipped.plugins_for("devices/abc/telemetry") == ("batch-stats", "enrich")
    assert shipped.wants_raw("devices/abc/raw")
    assert not shipped.wants_raw("devices/abc/telemetry")


async def test_frame_decoder_turns_a_frame_into_telemetry(shipped: PluginManager) -> None:
    raw = frame(-1205, 45, 3012, 0b1000_0101)
    source = event("devices/sensor-7/raw", payload={}, raw=raw)
    [out] = await shipped.call("frame-decoder", source)
    assert out.topic == "devices/sensor-7/telemetry"
    assert out.device_id == "sensor-7"
    assert out.hops == 1
    assert out.source == "derived"
    assert out.payload == {
        "temperature": -12.05,
        "humidity": 45,
        "battery_mv": 3012,
        "motion": True,
        "door_open": False,
        "low_battery": True,
        "button": True,
        "frame_version": 1,
    }


async def test_frame_decoder_reads_version_2_pressure(shipped: PluginManager) -> None:
    [out] = await shipped.call(
        "frame-decoder", event("devices/s/raw", payload={}, raw=frame(2150, 40, 2900, 0, 10132))
    )
    assert out.payload["pressure_hpa"] == 1013.2
    assert out.payload["temperature"] == 21.5
    assert out.payload["frame_version"] == 2


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x01\x02", "too short"),
        (b"\x09" + bytes(8), "unknown frame version"),
        (struct.pack(">BhBHB", 1, 0, 101, 0, 0), "humidity"),
        (b"\x02" + bytes(6), "version 2"),
    ],
)
async def test_frame_decoder_rejects_bad_frames(
    shipped: PluginManager, raw: bytes, reason: str
) -> None:
    with pytest.raises(PluginRejected, match=reason):
        await shipped.call("frame-decoder", event("devices/s/raw", payload={}, raw=raw))
    stats = shipped.stats("frame-decoder")
    assert stats.rejected == 1
    assert stats.restart_count == 0  # a rejection is not a fault: the instance stays warm


@functools.cache
def decoder_instance() -> PluginInstance:
    """One frame-decoder instance shared by the hypothesis examples (no event loop needed)."""
    runtime = PluginRuntime(
        manifest=load_manifest(SHIPPED / "frame-decoder"), cache=ModuleCache(None)
    )
    return PluginInstance(runtime, instance_id=1)


@settings(max_examples=200, deadline=None)
@given(
    temp=st.integers(-32768, 32767),
    humidity=st.integers(0, 100),
    battery=st.integers(0, 65535),
    flags=st.integers(0, 255),
    pressure=st.none() | st.integers(0, 65535),
)
def test_frame_decoder_matches_a_python_decoder(
    temp: int, humidity: int, battery: int, flags: int, pressure: int | None
) -> None:
    [output] = decoder_instance().call(frame(temp, humidity, battery, flags, pressure))
    payload = output.payload
    assert payload["temperature"] == pytest.approx(temp / 100, abs=1e-9)
    assert payload["humidity"] == humidity
    assert payload["battery_mv"] == battery
    assert payload["motion"] is bool(flags & 1)
    assert payload["door_open"] is bool(flags & 2)
    assert payload["low_battery"] is bool(flags & 4)
    assert payload["button"] is bool(flags & 128)
    if pressure is not None:
        assert payload["pressure_hpa"] == pytest.approx(pressure / 10, abs=1e-9)


async def test_enrich_adds_derived_values(shipped: PluginManager) -> None:
    source = event("devices/d1/telemetry", {"temperature": 31.5, "humidity": 70, "x": [1, {}]})
    [out] = await shipped.call("enrich", source)
    assert out.topic == "devices/d1/enriched"
    payload = out.payload
    assert payload["temperature"] == 31.5 and payload["x"] == [1, {}]
    assert payload["temperature_f"] == 88.7
    assert payload["dew_point"] == pytest.approx(25.36, abs=0.01)
    assert payload["heat_index"] == pytest.approx(38.97, abs=0.05)
    assert payload["alarms"] == ["heat_caution"]


async def test_enrich_flags_out_of_range_and_skips_payloads_without_temperature(
    shipped: PluginManager,
) -> None:
    [out] = await shipped.call("enrich", event("devices/d/telemetry", {"temperature": 120}))
    assert out.payload["alarms"] == ["temperature_out_of_range"]
    assert out.payload["temperature_f"] == 248
    [out] = await shipped.call(
        "enrich", event("devices/d/telemetry", {"temperature": 20, "humidity": 140})
    )
    assert out.payload["alarms"] == ["humidity_out_of_range"]
    assert await shipped.call("enrich", event("devices/d/telemetry", {"pressure": 1000})) == []
    assert await shipped.call("enrich", event("devices/d/telemetry", {})) == []


async def test_batch_stats_summarises_each_device(shipped: PluginManager) -> None:
    events = [
        event(f"devices/d{i % 2}/telemetry", {"temperature": 20 + i, "status": "ok", "n": i})
        for i in range(6)
    ]
    outcome = await shipped.call_batch("batch-stats", events)
    assert outcome.failed == []
    outputs = outcome.outputs
    by_topic = {e.topic: e for e in outputs}
    assert set(by_topic) == {"devices/d0/stats", "devices/d1/stats"}
    d0 = by_topic["devices/d0/stats"].payload
    assert d0["device_id"] == "d0" and d0["count"] == 3
    assert d0["fields"]["temperature"] == {
        "count": 3,
        "min": 20,
        "max": 24,
        "mean": 22,
        "last": 24,
    }
    assert "status" not in d0["fields"]
    # Each summary is derived from that device's last event in the batch.
    assert by_topic["devices/d1/stats"].device_id == "d1"
    assert all(e.hops == 1 for e in outputs)


async def test_batch_only_plugin_takes_a_single_event_as_a_batch_of_one(
    shipped: PluginManager,
) -> None:
    [out] = await shipped.call("batch-stats", event("devices/d/telemetry", {"temperature": 1}))
    assert out.topic == "devices/d/stats"
    assert out.payload["fields"]["temperature"]["last"] == 1
    assert shipped.stats("batch-stats").total_executions == 1


async def test_decoder_output_feeds_enrich(shipped: PluginManager) -> None:
    """The pipeline a rule would see: raw frame -> telemetry -> enriched telemetry."""
    [telemetry] = await shipped.call(
        "frame-decoder", event("devices/s9/raw", payload={}, raw=frame(3300, 60, 3000, 0))
    )
    assert shipped.plugins_for(telemetry.topic) == ("batch-stats", "enrich")
    [enriched] = await shipped.call("enrich", telemetry)
    assert enriched.hops == 2
    assert enriched.payload["temperature_f"] == 91.4
    assert enriched.payload["battery_mv"] == 3000


async def test_plugin_test_helper_parses_json(shipped: PluginManager) -> None:
    [out] = await shipped.test("enrich", b'{"temperature": 0}')
    assert out.payload["temperature_f"] == 32
    [out] = await shipped.test("frame-decoder", frame(100, 1, 2, 0))
    assert out.topic == "devices/test/telemetry"
