"""Pool behaviour: hits and misses, recycling, restart, exhaustion, concurrency, memory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from flux.plugins import PluginManager, PluginTrap, PoolExhausted
from flux.plugins.instance import PluginInstance
from flux.plugins.manifest import load_manifest
from flux.plugins.pool import InstancePool
from flux.plugins.runtime import ModuleCache, PluginRuntime
from tests.plugins.helpers import echo_module, event, module, write_plugin

# Traps when the payload's first byte after '{' is 'x' (i.e. {"x":...}), echoes otherwise.
SOMETIMES_TRAPS = echo_module().replace(
    '(func (export "on_msg") (param $p i32) (param $n i32) (result i64) (local $out i32)',
    '(func (export "on_msg") (param $p i32) (param $n i32) (result i64) (local $out i32)\n'
    "    (if (i32.eq (i32.load8_u offset=2 (local.get $p)) (i32.const 120))"
    " (then unreachable))",
)


def _runtime(folder: Path) -> PluginRuntime:
    return PluginRuntime(manifest=load_manifest(folder), cache=ModuleCache(None))


def _sample(name: str, plugin: str) -> float:
    return REGISTRY.get_sample_value(name, {"plugin": plugin}) or 0.0


async def test_hits_misses_and_available(plugins_dir: Path, cache_dir: Path) -> None:
    write_plugin(plugins_dir, "p-hits", echo_module(), manifest="[pool]\nsize = 3\n")
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        hits_before = _sample("flux_plugin_pool_hits_total", "p-hits")
        for i in range(10):
            await manager.call("p-hits", event(payload={"i": i}))
        stats = manager.stats("p-hits")
        # Inline calls never overlap: the one warm instance serves every call.
        assert (stats.hits, stats.misses, stats.size, stats.available) == (10, 0, 1, 1)
        assert stats.hit_ratio == 1.0
        assert stats.total_executions == 10
        assert stats.instances[0].executions == 10
        assert _sample("flux_plugin_pool_hits_total", "p-hits") == hits_before + 10
        assert _sample("flux_plugin_pool_available", "p-hits") == 1


async def test_recycles_after_n_executions(plugins_dir: Path, cache_dir: Path) -> None:
    write_plugin(plugins_dir, "p-n", echo_module(), manifest="[recycle]\nafter_executions = 5\n")
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        for i in range(12):
            [out] = await manager.call("p-n", event(payload={"i": i}))
            assert out.payload == {"i": i}
        stats = manager.stats("p-n")
        assert stats.restart_count == 2
        assert stats.recycles == {"executions": 2}
        assert stats.last_restart_time is not None
        assert stats.total_executions == 12
        assert [i.executions for i in stats.instances] == [2]
        assert stats.size == 1 and stats.misses == 0  # callers never waited for a recycle


async def test_recycles_when_memory_passes_high_water(plugins_dir: Path, cache_dir: Path) -> None:
    # The echo module's bump allocator never frees: memory grows with every call.
    write_plugin(
        plugins_dir,
        "p-mem",
        echo_module(),
        manifest="[recycle]\nafter_executions = 0\nmemory_high_water_bytes = 196_608\n",
    )
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        big = {"blob": "x" * 4000}
        for _ in range(100):
            await manager.call("p-mem", event(payload=big))
        stats = manager.stats("p-mem")
        assert stats.recycles.get("memory", 0) >= 2
        assert all(i.memory_bytes <= 196_608 + 65_536 for i in stats.instances)


async def test_trap_recycles_and_the_next_call_succeeds(plugins_dir: Path, cache_dir: Path) -> None:
    write_plugin(plugins_dir, "p-trap", SOMETIMES_TRAPS)
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        await manager.call("p-trap", event(payload={"a": 1}))
        before = manager.stats("p-trap").instances[0].created_at
        with pytest.raises(PluginTrap):
            await manager.call("p-trap", event(payload={"x": 1}))
        [out] = await manager.call("p-trap", event(payload={"a": 2}))
        assert out.payload == {"a": 2}
        stats = manager.stats("p-trap")
        assert stats.traps == 1 and stats.recycles == {"trap": 1}
        assert stats.instances[0].executions == 1  # a fresh instance served the last call
        assert stats.instances[0].created_at >= before


async def test_call_many_continues_after_a_trap(plugins_dir: Path, cache_dir: Path) -> None:
    write_plugin(plugins_dir, "p-many", SOMETIMES_TRAPS)
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        events = [event(payload={"x" if i == 3 else "a": i}) for i in range(8)]
        outcomes = await manager.call_many("p-many", events)
        assert [o.event for o in outcomes] == events
        assert isinstance(outcomes[3].error, PluginTrap)
        assert [o.outputs[0].payload for i, o in enumerate(outcomes) if i != 3] == [
            {"a": i} for i in range(8) if i != 3
        ]
        stats = manager.stats("p-many")
        assert stats.total_executions == 8 and stats.traps == 1


async def test_manual_restart_replaces_every_instance(plugins_dir: Path, cache_dir: Path) -> None:
    write_plugin(plugins_dir, "p-restart", echo_module())
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        for _ in range(3):
            await manager.call("p-restart", event())
        stats = await manager.restart("p-restart")
        assert stats.restart_count == 1 and stats.recycles == {"restart": 1}
        assert [i.executions for i in stats.instances] == [0]
        await manager.call("p-restart", event())
        assert manager.stats("p-restart").instances[0].executions == 1


async def test_restart_of_a_busy_instance_happens_when_it_returns(
    plugins_dir: Path,
) -> None:
    folder = write_plugin(plugins_dir, "p-busy", echo_module())
    pool = InstancePool(runtime=_runtime(folder), max_size=2, acquire_timeout=1)
    busy = await pool.acquire()
    assert pool.restart() == 0  # nothing idle to replace yet
    results, final = pool.run(busy, [b'{"a":1}'])
    assert results[0].recycle_reason == "restart"
    assert final is not None and final is not busy and busy.closed
    pool.release(busy, final, results)
    assert pool.stats().recycles == {"restart": 1}
    pool.close()


async def test_exhausted_pool_waits_then_times_out(plugins_dir: Path) -> None:
    folder = write_plugin(plugins_dir, "p-exhaust", echo_module())
    pool = InstancePool(runtime=_runtime(folder), max_size=1, acquire_timeout=0.05)
    first = await pool.acquire()  # a miss: created on demand
    # Nobody releases: the second caller waits, then gives up with a named error.
    with pytest.raises(PoolExhausted, match="no instance free"):
        await pool.acquire()
    # A waiter is served as soon as the instance comes back.
    waiter = asyncio.create_task(pool.acquire(timeout=10))
    await asyncio.sleep(0)  # one loop step: the task parks in the pool
    assert len(pool._waiters) == 1
    pool.release(first, first)
    second = await waiter
    assert second is first
    stats = pool.stats()
    assert (stats.misses, stats.waits, stats.exhausted, stats.hits) == (1, 2, 1, 1)
    assert stats.in_use == 1 and stats.available == 0
    pool.release(second, second)
    pool.close()
    assert pool.stats().size == 0


async def test_exhaustion_through_the_manager_is_counted(
    plugins_dir: Path, cache_dir: Path
) -> None:
    write_plugin(
        plugins_dir, "p-full", echo_module(), manifest="[pool]\nsize = 1\nacquire_timeout_ms = 10\n"
    )
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        pool = manager._plugins["p-full"].pool
        held = await pool.acquire()
        before = _sample("flux_plugin_pool_exhausted_total", "p-full")
        with pytest.raises(PoolExhausted):
            await manager.call("p-full", event())
        assert _sample("flux_plugin_pool_exhausted_total", "p-full") == before + 1
        pool.release(held, held)
        assert len(await manager.call("p-full", event())) == 1


@pytest.mark.parametrize("executor", ["inline", "thread"])
async def test_concurrent_callers(plugins_dir: Path, cache_dir: Path, executor: str) -> None:
    write_plugin(
        plugins_dir,
        "p-conc",
        echo_module(),
        manifest="[pool]\nsize = 3\n[recycle]\nafter_executions = 40\n",
    )
    async with PluginManager(
        plugins_dir=plugins_dir,
        cache_dir=cache_dir,
        executor=executor,  # type: ignore[arg-type]
        max_workers=3,
    ) as manager:
        results = await asyncio.gather(
            *(manager.call("p-conc", event(payload={"i": i})) for i in range(300))
        )
        assert [r[0].payload["i"] for r in results] == list(range(300))
        stats = manager.stats("p-conc")
        assert stats.total_executions == 300
        assert stats.size <= 3 and stats.in_use == 0
        assert stats.hits + stats.misses == 300
        assert stats.recycles.get("executions", 0) >= 300 // 40 - 3


async def test_instances_are_isolated(plugins_dir: Path) -> None:
    """Two instances of one plugin do not share memory or globals."""
    counter = module(
        """(global $calls (mut i32) (i32.const 0))
           (func (export "on_msg") (param i32 i32) (result i64)
             (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
             (i32.store8 (i32.const 100) (i32.add (i32.const 48) (global.get $calls)))
             (i64.const 0))"""
    )
    folder = write_plugin(plugins_dir, "p-iso", counter)
    runtime = _runtime(folder)
    a = PluginInstance(runtime, instance_id=1)
    b = PluginInstance(runtime, instance_id=2)
    for _ in range(3):
        a.call(b"{}")
    b.call(b"{}")
    assert a.executions == 3 and b.executions == 1
    a.close()
    b.close()


def _memory_flat(plugins_dir: Path, calls: int) -> tuple[int, int]:
    """Run ``calls`` calls on a leaking plugin with recycling; return (max wasm memory seen,
    resident set growth in bytes between 10% and 100% of the calls)."""
    folder = write_plugin(
        plugins_dir, "p-leak", echo_module(), manifest="[recycle]\nafter_executions = 1000\n"
    )
    pool = InstancePool(runtime=_runtime(folder), max_size=1, acquire_timeout=1)
    pool.warm(1)
    instance = pool._idle.pop()
    payload = b'{"reading":' + b"1" * 200 + b"}"
    chunk = [payload] * 500
    peak = 0
    rss_start = 0
    for done in range(0, calls, len(chunk)):
        results, final = pool.run(instance, chunk)
        assert final is not None and all(r.error is None for r in results)
        instance = final
        peak = max(peak, instance.memory_bytes())
        if done == calls // 10:
            rss_start = _rss()
    growth = _rss() - rss_start
    instance.close()
    return peak, growth


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_memory_stays_flat_with_recycling(plugins_dir: Path) -> None:
    peak, growth = _memory_flat(plugins_dir, 10_000)
    # Without recycling the leak would reach ~2.3 MB of wasm memory per 10k calls.
    assert peak <= 5 * 65_536
    assert growth < 16 * 1024 * 1024


@pytest.mark.slow
def test_memory_stays_flat_across_100k_calls(plugins_dir: Path) -> None:
    peak, growth = _memory_flat(plugins_dir, 100_000)
    assert peak <= 5 * 65_536
    assert growth < 16 * 1024 * 1024


async def test_a_plugin_can_opt_into_the_thread_pool(plugins_dir: Path, cache_dir: Path) -> None:
    write_plugin(plugins_dir, "p-threaded", echo_module(), manifest='[pool]\nexecutor = "thread"\n')
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        assert manager.executor_mode == "inline"
        results = await asyncio.gather(
            *(manager.call("p-threaded", event(payload={"i": i})) for i in range(20))
        )
        assert [r[0].payload["i"] for r in results] == list(range(20))
        assert manager._executor is not None  # created on first threaded call
    assert manager._executor is None  # and shut down with the manager
