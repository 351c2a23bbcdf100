"""Reload (build first, swap, none lost), the on-disk module cache, and manifest errors."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import wasmtime

from flux.plugins import PluginLoadError, PluginManager, PluginNotFound, load_manifest
from flux.plugins.manifest import parse_manifest
from flux.plugins.runtime import ModuleCache
from tests.plugins.conftest import SHIPPED
from tests.plugins.helpers import echo_module, event, write_plugin


@pytest.mark.parametrize("executor", ["inline", "thread"])
async def test_reload_while_events_flow_loses_none(
    plugins_dir: Path, cache_dir: Path, executor: str
) -> None:
    folder = write_plugin(plugins_dir, "p-live", echo_module("v1"), manifest="[pool]\nsize = 2\n")
    async with PluginManager(
        plugins_dir=plugins_dir,
        cache_dir=cache_dir,
        executor=executor,  # type: ignore[arg-type]
    ) as manager:
        old_pool = manager._plugins["p-live"].pool
        (folder / "plugin.wasm").write_bytes(wasmtime.wat2wasm(echo_module("v2")))
        tasks: list[asyncio.Task[list[object]]] = []
        reload_task = None
        for i in range(400):
            tasks.append(asyncio.create_task(manager.call("p-live", event(payload={"i": i}))))
            if i == 200:
                reload_task = asyncio.create_task(manager.reload())
            await asyncio.sleep(0)
        results = await asyncio.gather(*tasks)
        assert reload_task is not None
        report = await reload_task
        assert report.loaded == ["p-live"] and report.ok
        # Every event produced its output, on one version or the other.
        assert [r[0].payload["i"] for r in results] == list(range(400))  # type: ignore[attr-defined]
        topics = {r[0].topic for r in results}  # type: ignore[attr-defined]
        assert topics <= {"out/v1", "out/v2"}
        [after] = await manager.call("p-live", event())
        assert after.topic == "out/v2"
        # The old pool is closed and has given back every instance.
        assert old_pool.closed and old_pool.stats().size == 0
        assert manager.stats("p-live").in_use == 0


async def test_reload_keeps_unchanged_and_reports_changes(
    plugins_dir: Path, cache_dir: Path
) -> None:
    write_plugin(plugins_dir, "keep", echo_module())
    write_plugin(plugins_dir, "drop", echo_module())
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        keep_pool = manager._plugins["keep"].pool
        for path in (plugins_dir / "drop").iterdir():
            path.unlink()
        (plugins_dir / "drop").rmdir()
        write_plugin(plugins_dir, "added", echo_module())
        report = await manager.reload()
        assert (report.loaded, report.unchanged, report.removed) == (["added"], ["keep"], ["drop"])
        assert manager._plugins["keep"].pool is keep_pool
        assert manager.names() == {"keep", "added"}
        with pytest.raises(PluginNotFound):
            await manager.call("drop", event())


async def test_a_broken_new_version_keeps_the_old_one(plugins_dir: Path, cache_dir: Path) -> None:
    folder = write_plugin(plugins_dir, "p-break", echo_module())
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        (folder / "plugin.wasm").write_bytes(
            wasmtime.wat2wasm('(module (memory (export "memory") 1))')
        )
        report = await manager.reload()
        assert report.kept == ["p-break"] and "p-break" in report.errors
        assert report.as_dict()["errors"]["p-break"]["error"] == "PluginLoadError"
        assert len(await manager.call("p-break", event())) == 1
        assert "p-break" in manager.load_errors


async def test_concurrent_reloads_are_coalesced(plugins_dir: Path, cache_dir: Path) -> None:
    write_plugin(plugins_dir, "p-co", echo_module())
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        runs = 0
        real = manager._reload_now

        async def counting() -> object:
            nonlocal runs
            runs += 1
            for _ in range(10):  # a reload takes a while (compiling on a thread)
                await asyncio.sleep(0)
            return await real()

        manager._reload_now = counting  # type: ignore[method-assign]
        reports = await asyncio.gather(*(manager.reload() for _ in range(5)))
        assert runs == 1  # asked together, before any reload started: one reload for all
        assert all(report is reports[0] for report in reports)
        running = asyncio.create_task(manager.reload())
        await asyncio.sleep(0)  # that reload is under way
        later = await asyncio.gather(*(manager.reload() for _ in range(4)))
        await running
        assert runs == 3  # the one running, plus one for everything that asked meanwhile
        assert all(report is later[0] for report in later)


def _cache_layout(cache_dir: Path) -> tuple[int, int, int]:
    """Return (entries, key file mode, directory mode)."""
    entries = len(list(cache_dir.glob("*.cwasm")))
    return (
        entries,
        (cache_dir / "cache.key").stat().st_mode & 0o777,
        cache_dir.stat().st_mode & 0o777,
    )


def _corrupt_entries(cache_dir: Path) -> None:
    """Flip one byte in the middle of every entry: what an attacker or a bad disk would do."""
    for entry in cache_dir.glob("*.cwasm"):
        blob = bytearray(entry.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        entry.write_bytes(bytes(blob))


async def test_second_load_deserializes_from_the_cache(cache_dir: Path) -> None:
    async with PluginManager(plugins_dir=SHIPPED, cache_dir=cache_dir) as first:
        assert {first.describe(n)["module"]["cache"] for n in first.names()} == {"compiled"}
    assert _cache_layout(cache_dir) == (3, 0o600, 0o700)
    async with PluginManager(plugins_dir=SHIPPED, cache_dir=cache_dir) as second:
        assert {second.describe(n)["module"]["cache"] for n in second.names()} == {"hit"}
        [out] = await second.call("enrich", event("devices/d/telemetry", {"temperature": 10}))
        assert out.payload["temperature_f"] == 50


async def test_tampered_cache_entry_is_recompiled_not_loaded(cache_dir: Path) -> None:
    async with PluginManager(plugins_dir=SHIPPED, cache_dir=cache_dir):
        pass
    _corrupt_entries(cache_dir)
    async with PluginManager(plugins_dir=SHIPPED, cache_dir=cache_dir) as manager:
        assert {manager.describe(n)["module"]["cache"] for n in manager.names()} == {"compiled"}
        assert len(await manager.call("enrich", event("d/x", {"temperature": 1}))) == 1


async def test_cache_refuses_a_shared_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    cache = ModuleCache(shared)
    engine = wasmtime.Engine()
    wasm = wasmtime.wat2wasm(echo_module())
    _, info = cache.load(engine, wasm, "x")
    assert info.outcome == "compiled" or info.outcome == "uncached"
    assert "not private" in cache.disabled_reason
    assert list(shared.iterdir()) == []


async def test_manager_lifecycle_is_guarded(plugins_dir: Path, cache_dir: Path) -> None:
    manager = PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir)
    async with manager:
        with pytest.raises(RuntimeError, match="already started"):
            await manager.start()
    with pytest.raises(RuntimeError, match="closed"):
        await manager.reload()


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"abi": 2}, "abi"),
        ({"name": "Bad Name"}, "name"),
        ({"wasm": "../escape.wasm"}, "wasm"),
        ({"topics": ["devices/#/raw"]}, "topics"),
        ({"input": "xml"}, "input"),
        ({"limits": {"fuel": 10, "timeout_ms": 5}}, "limits.fuel"),
        ({"limits": {"fuel": 1_000_000, "timeout_ms": 5}}, "limits"),
        ({"exports": {"on_msg": "", "on_batch": ""}}, "exports"),
        ({"recycle": {"memory_high_water_bytes": 1 << 30}}, ""),
        ({"surprise": 1}, "surprise"),
        ({"pool": {"size": 0}}, "pool.size"),
    ],
)
def test_manifest_errors_name_the_key(patch: dict[str, object], key: str) -> None:
    base: dict[str, object] = {"name": "ok", "version": "1", "abi": 1, "wasm": "x.wasm"}
    with pytest.raises(PluginLoadError) as caught:
        parse_manifest({**base, **patch}, root=Path("/nowhere"))
    assert caught.value.key == key, caught.value


def test_shipped_manifests_are_valid() -> None:
    for name in ("frame-decoder", "enrich", "batch-stats"):
        manifest = load_manifest(SHIPPED / name)
        assert manifest.name == name and manifest.abi == 1 and not manifest.wasi
        assert manifest.wasm_path.is_file()
