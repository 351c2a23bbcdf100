"""Hostile modules: each is stopped with a named error and the gateway keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from flux.plugins import (
    PluginLimitExceeded,
    PluginManager,
    PluginOutputError,
    PluginTimeout,
    PluginTrap,
)
from tests.plugins.helpers import echo_module, event, module, write_plugin

LIMITS = """
[pool]
size = 2
[limits]
fuel = 1_000_000
max_memory_bytes = 2_097_152
max_stack_bytes = 65_536
"""

RUNAWAY = {
    "spin": (
        '(func (export "on_msg") (param i32 i32) (result i64) (loop (br 0)) (i64.const 0))',
        PluginTimeout,
        None,
    ),
    # Grows page by page toward 4 GiB until memory.grow fails at limits.max_memory_bytes.
    "grow": (
        """(func (export "on_msg") (param i32 i32) (result i64)
             (loop (br_if 0 (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
             (i64.const 0))""",
        PluginLimitExceeded,
        "memory",
    ),
    "unreachable": (
        '(func (export "on_msg") (param i32 i32) (result i64) unreachable)',
        PluginTrap,
        None,
    ),
    "recurse": (
        """(func $r (param i32) (result i32) (call $r (i32.add (local.get 0) (i32.const 1))))
           (func (export "on_msg") (param i32 i32) (result i64)
             (i64.extend_i32_u (call $r (i32.const 0))))""",
        PluginLimitExceeded,
        "stack",
    ),
    "oob-output": (
        """(func (export "on_msg") (param i32 i32) (result i64)
             (i64.const 0xFFFF000000000010))""",
        PluginOutputError,
        None,
    ),
    "bad-json": (
        """(data (i32.const 64) "[{\\"payload\\": nope")
           (func (export "on_msg") (param i32 i32) (result i64)
             (i64.or (i64.shl (i64.const 64) (i64.const 32)) (i64.const 17)))""",
        PluginOutputError,
        None,
    ),
    "emit-oob": (
        """(func (export "on_msg") (param i32 i32) (result i64)
             (call $emit (i32.const 0) (i32.const 4) (i32.const 0x7FFFFFF0) (i32.const 64))
             (i64.const 0))""",
        PluginOutputError,
        None,
    ),
}


def _write_all(root: Path) -> None:
    emit_import = '(import "flux" "emit" (func $emit (param i32 i32 i32 i32)))'
    for name, (body, _, _) in RUNAWAY.items():
        imports = emit_import if "emit" in name else ""
        write_plugin(root, name, module(body, imports=imports), manifest=LIMITS)
    write_plugin(root, "good", echo_module(), manifest=LIMITS)


def _count(plugin: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "flux_plugin_executions_total", {"plugin": plugin, "result": result}
    )
    return value or 0.0


@pytest.mark.parametrize("name", sorted(RUNAWAY))
async def test_runaway_module_is_stopped_and_others_keep_working(
    plugins_dir: Path, cache_dir: Path, name: str
) -> None:
    _write_all(plugins_dir)
    error_type, limit = RUNAWAY[name][1], RUNAWAY[name][2]
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        assert manager.load_errors == {}
        before = _count(name, error_type.result)
        for attempt in range(3):  # every call fails the same way, on a fresh instance
            with pytest.raises(error_type) as caught:
                await manager.call(name, event())
            assert caught.value.plugin == name
            if limit is not None:
                assert caught.value.fields["limit"] == limit
            [out] = await manager.call("good", event(payload={"attempt": attempt}))
            assert out.payload == {"attempt": attempt}
        stats = manager.stats(name)
        assert stats.restart_count == 3
        assert stats.total_executions == 3
        assert stats.size <= stats.max_size
        assert stats.available == stats.size  # a replacement took each failed instance's place
        assert _count(name, error_type.result) == before + 3
        assert manager.stats("good").restart_count == 0


async def test_trap_kinds_are_reported(plugins_dir: Path, cache_dir: Path) -> None:
    _write_all(plugins_dir)
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        with pytest.raises(PluginTrap) as caught:
            await manager.call("unreachable", event())
        assert caught.value.trap == "unreachable"
        with pytest.raises(PluginTimeout):
            await manager.call("spin", event())
        assert manager.stats("unreachable").traps == 1
        assert manager.stats("unreachable").recycles == {"trap": 1}
        assert manager.stats("spin").timeouts == 1
        assert manager.stats("spin").recycles == {"timeout": 1}


async def test_epoch_deadline_stops_a_spinning_module(plugins_dir: Path, cache_dir: Path) -> None:
    body = RUNAWAY["spin"][0]
    write_plugin(plugins_dir, "spin-epoch", module(body), manifest="[limits]\ntimeout_ms = 20\n")
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        with pytest.raises(PluginTimeout, match="20 ms"):
            await manager.call("spin-epoch", event())


LOAD_FAILURES = {
    "no-entry": (module(""), "exports.on_msg"),
    "no-memory": (
        '(module (func (export "flux_alloc") (param i32) (result i32) (i32.const 0))'
        ' (func (export "on_msg") (param i32 i32) (result i64) (i64.const 0)))',
        "exports.memory",
    ),
    "no-alloc": (
        '(module (memory (export "memory") 1)'
        ' (func (export "on_msg") (param i32 i32) (result i64) (i64.const 0)))',
        "exports.flux_alloc",
    ),
    "wrong-signature": (
        module('(func (export "on_msg") (param i32) (result i32) (i32.const 0))'),
        "exports.on_msg",
    ),
    "wrong-import": (
        module(
            '(func (export "on_msg") (param i32 i32) (result i64) (i64.const 0))',
            imports='(import "flux" "emit" (func (param i32 i32)))',
        ),
        "imports",
    ),
    "unknown-import": (
        module(
            '(func (export "on_msg") (param i32 i32) (result i64) (i64.const 0))',
            imports='(import "env" "system" (func (param i32) (result i32)))',
        ),
        "imports",
    ),
    "wasi-undeclared": (
        module(
            '(func (export "on_msg") (param i32 i32) (result i64) (i64.const 0))',
            imports='(import "wasi_snapshot_preview1" "fd_write"'
            " (func (param i32 i32 i32 i32) (result i32)))",
        ),
        "wasi",
    ),
    "bad-abi-version": (
        module(
            '(func (export "flux_abi_version") (result i32) (i32.const 2))'
            '(func (export "on_msg") (param i32 i32) (result i64) (i64.const 0))'
        ),
        "exports.flux_abi_version",
    ),
    "huge-memory": (
        module(
            '(func (export "on_msg") (param i32 i32) (result i64) (i64.const 0))',
            memory='(memory (export "memory") 1000)',
        ),
        "",
    ),
    "start-traps": (
        module(
            "(func $s unreachable) (start $s)"
            '(func (export "on_msg") (param i32 i32) (result i64) (i64.const 0))'
        ),
        "",
    ),
}


async def test_bad_modules_are_refused_at_load_with_the_reason(
    plugins_dir: Path, cache_dir: Path
) -> None:
    for name, (wat, _) in LOAD_FAILURES.items():
        write_plugin(plugins_dir, name, wat, manifest=LIMITS)
    write_plugin(plugins_dir, "good", echo_module(), manifest=LIMITS)
    (plugins_dir / "not-wasm").mkdir()
    (plugins_dir / "not-wasm" / "plugin.toml").write_text(
        'name = "not-wasm"\nversion = "1"\nabi = 1\nwasm = "x.wasm"\n'
    )
    (plugins_dir / "not-wasm" / "x.wasm").write_bytes(b"\x00asm garbage")
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        assert manager.names() == {"good"}
        errors = manager.load_errors
        assert set(errors) == set(LOAD_FAILURES) | {"not-wasm"}
        for name, (_, key) in LOAD_FAILURES.items():
            if key:
                assert errors[name].key == key, (name, errors[name])
        assert "wasi = true" in errors["wasi-undeclared"].message
        assert "max_memory_bytes" in errors["huge-memory"].message
        assert errors["not-wasm"].key == "wasm"
        [out] = await manager.call("good", event(payload={"still": "serving"}))
        assert out.payload == {"still": "serving"}


async def test_declared_wasi_gets_no_filesystem(plugins_dir: Path, cache_dir: Path) -> None:
    """With ``wasi = true`` the imports link, but there is nothing behind them: no preopened
    directory exists, so path_open on fd 3 fails with EBADF (8)."""
    wat = module(
        """(func (export "on_msg") (param i32 i32) (result i64)
             (if (i32.ne (call $open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 1)
                          (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0)
                          (i32.const 200))
                         (i32.const 8))
               (then unreachable))
             (i64.const 0))""",
        imports='(import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32'
        " i32 i32 i64 i64 i32 i32) (result i32)))",
    )
    write_plugin(plugins_dir, "wasi-ok", wat, extra_top="wasi = true")
    async with PluginManager(plugins_dir=plugins_dir, cache_dir=cache_dir) as manager:
        assert manager.load_errors == {}
        assert await manager.call("wasi-ok", event()) == []
