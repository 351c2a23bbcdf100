"""Speed of the plugin call path (pytest-benchmark; no timing assertions).

Run: pytest tests/plugins/test_bench_plugins.py --benchmark-only
Compare ``raw_generic`` (wasmtime-py ``Func.__call__``) with ``raw_unchecked`` (the fast
path alone), ``raw_unchecked_copy_in_out`` (plus copying the message in and out: the
issue's reference), ``instance_call`` (fast path + copy-in + fuel + bounds checks) and the
manager rows (pool acquire/release, metrics, derived events); ``*_x100`` rows are per 100
messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from flux.plugins import PluginManager
from flux.plugins import instance as fast
from flux.plugins.instance import PluginInstance
from flux.plugins.manifest import load_manifest
from flux.plugins.runtime import ModuleCache, PluginRuntime
from tests.plugins.conftest import SHIPPED
from tests.plugins.helpers import event, module, write_plugin

pytestmark = pytest.mark.benchmark(group="plugin-call")

NOOP = module('(func (export "on_msg") (param i32 i32) (result i64) (i64.const 0))')
MESSAGE = b'{"temperature":21.5,"humidity":40}'


@pytest.fixture
def noop_instance(tmp_path: Path) -> Iterator[PluginInstance]:
    folder = write_plugin(tmp_path, "noop", NOOP, manifest="[limits]\nfuel = 1_000_000\n")
    runtime = PluginRuntime(manifest=load_manifest(folder), cache=ModuleCache(None))
    instance = PluginInstance(runtime, instance_id=1)
    yield instance
    instance.close()


def test_raw_generic(benchmark: Any) -> None:
    """wasmtime-py's generic path: type lookup and Val conversion on every call."""
    config = wasmtime.Config()
    config.consume_fuel = True
    engine = wasmtime.Engine(config)
    store = wasmtime.Store(engine)
    store.set_fuel(10**15)
    func = wasmtime.Instance(store, wasmtime.Module(engine, NOOP), []).exports(store)["on_msg"]
    assert isinstance(func, wasmtime.Func)
    assert benchmark(func, store, 4096, 10) == 0


def test_raw_unchecked(benchmark: Any, noop_instance: PluginInstance) -> None:
    """The bare fast path: fuel reset + wasmtime_func_call_unchecked with a prepared array."""
    inst = noop_instance
    args = inst._args

    def call() -> int:
        fast._set_fuel(inst._ctx, 1_000_000)
        args[0].i32 = 4096
        args[1].i32 = 10
        fast._call_unchecked(inst._ctx, inst._on_msg, inst._args_addr, 2, inst._trap_addr)
        return int(args[0].i64)

    assert benchmark(call) == 0


def test_raw_unchecked_copy_in_out(benchmark: Any, noop_instance: PluginInstance) -> None:
    """The issue's reference "raw wasmtime call with copy-in/out": the bare fast path plus
    copying the message into linear memory and as many bytes back out."""
    inst = noop_instance
    args = inst._args
    size = len(MESSAGE)

    def call() -> bytes:
        base = fast._memory_data(inst._ctx, inst._mem)
        fast._memmove(base + 4096, MESSAGE, size)
        fast._set_fuel(inst._ctx, 1_000_000)
        args[0].i32 = 4096
        args[1].i32 = size
        fast._call_unchecked(inst._ctx, inst._on_msg, inst._args_addr, 2, inst._trap_addr)
        return fast._string_at(fast._memory_data(inst._ctx, inst._mem) + 4096, size)

    assert benchmark(call) == MESSAGE


def test_instance_call(benchmark: Any, noop_instance: PluginInstance) -> None:
    """One ABI call: copy the message in, fuel, call, memory checks, (no) output."""
    assert benchmark(noop_instance.call, MESSAGE) == []


def test_instance_call_enrich(benchmark: Any) -> None:
    """A real plugin (Rust): JSON in, JSON out, parsed by the host."""
    runtime = PluginRuntime(manifest=load_manifest(SHIPPED / "enrich"), cache=ModuleCache(None))
    instance = PluginInstance(runtime, instance_id=1)
    [output] = benchmark(instance.call, MESSAGE)
    assert output.payload["temperature_f"] == 70.7
    instance.close()


@pytest.fixture
def shipped_loop(tmp_path: Path) -> Iterator[tuple[asyncio.AbstractEventLoop, PluginManager]]:
    loop = asyncio.new_event_loop()
    manager = PluginManager(plugins_dir=SHIPPED, cache_dir=tmp_path / "cache")
    loop.run_until_complete(manager.start())
    yield loop, manager
    loop.run_until_complete(manager.close())
    loop.close()


def test_manager_call_x100(benchmark: Any, shipped_loop: Any) -> None:
    """100 sequential ``PluginManager.call`` on enrich, inline on the loop."""
    loop, manager = shipped_loop
    source = event("devices/d/telemetry", {"temperature": 21.5, "humidity": 40})

    async def hundred() -> int:
        count = 0
        for _ in range(100):
            count += len(await manager.call("enrich", source))
        return count

    assert benchmark(lambda: loop.run_until_complete(hundred())) == 100
    stats = manager.stats("enrich")
    assert stats.hit_ratio == 1.0


def test_manager_call_many_x100(benchmark: Any, shipped_loop: Any) -> None:
    """``call_many`` with 100 events: one lease, one loop over the fast path."""
    loop, manager = shipped_loop
    events = [event("devices/d/telemetry", {"temperature": 21.5, "humidity": 40})] * 100
    outcomes = benchmark(lambda: loop.run_until_complete(manager.call_many("enrich", events)))
    assert len(outcomes) == 100 and all(o.error is None for o in outcomes)


def test_manager_call_batch_x100(benchmark: Any, shipped_loop: Any) -> None:
    """``call_batch`` with 100 events: one wasm call for the whole batch."""
    loop, manager = shipped_loop
    events = [event(f"devices/d{i % 5}/telemetry", {"temperature": i}) for i in range(100)]
    outcome = benchmark(lambda: loop.run_until_complete(manager.call_batch("batch-stats", events)))
    assert len(outcome.outputs) == 5 and outcome.failed == []
