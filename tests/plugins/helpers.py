"""Build throwaway plugins from inline WAT for the plugin tests."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import wasmtime

from flux.events import Event, new_event_id

#: A bump allocator and the ABI's required exports around a custom ``on_msg`` body.
ALLOC = """
  (global $bump (mut i32) (i32.const 4096))
  (func $alloc (export "flux_alloc") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump) (local.get $n)))
    (if (i32.gt_u (global.get $bump) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.const 1)))))
    (local.get $p))
"""


def module(body: str, *, memory: str = '(memory (export "memory") 1)', imports: str = "") -> str:
    """Return a WAT module: imports, memory, the bump allocator, then ``body``."""
    return f"(module {imports} {memory} {ALLOC} {body})"


#: on_msg that returns one output: {"topic": "out/<tag>", "payload": <input>} built in memory.
def echo_module(tag: str = "v1") -> str:
    """Return a WAT plugin that echoes its JSON input as the payload of one output."""
    prefix = f'[{{"topic":"out/{tag}","payload":'
    suffix = "}]"
    escaped = prefix.replace('"', '\\"')
    return module(
        f"""
  (data (i32.const 16) "{escaped}")
  (data (i32.const 256) "{suffix}")
  (func (export "on_msg") (param $p i32) (param $n i32) (result i64) (local $out i32)
    (local.set $out (call $alloc (i32.add (local.get $n) (i32.const {len(prefix) + 2}))))
    (memory.copy (local.get $out) (i32.const 16) (i32.const {len(prefix)}))
    (memory.copy (i32.add (local.get $out) (i32.const {len(prefix)}))
                 (local.get $p) (local.get $n))
    (memory.copy (i32.add (local.get $out) (i32.add (local.get $n) (i32.const {len(prefix)})))
                 (i32.const 256) (i32.const 2))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
            (i64.extend_i32_u (i32.add (local.get $n) (i32.const {len(prefix) + 2})))))
"""
    )


#: plugin.toml lines for a pool of one instance, called on a plugin thread, that gives up at
#: once: concurrent callers find it busy (waits) and give up (exhausted).
POOL_OF_ONE = """
[pool]
size = 1
executor = "thread"
acquire_timeout_ms = 0
"""


def write_plugin(
    root: Path,
    name: str,
    wat: str,
    *,
    manifest: str = "",
    input: str = "json",
    topics: tuple[str, ...] = ("test/#",),
    extra_top: str = "",
) -> Path:
    """Write ``root/name/{plugin.toml, plugin.wasm}``; ``manifest`` adds TOML sections."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plugin.wasm").write_bytes(wasmtime.wat2wasm(wat))
    topic_list = ", ".join(f'"{t}"' for t in topics)
    (folder / "plugin.toml").write_text(
        textwrap.dedent(
            f"""\
            name = "{name}"
            version = "1.0.0"
            abi = 1
            wasm = "plugin.wasm"
            input = "{input}"
            topics = [{topic_list}]
            {extra_top}
            """
        )
        + textwrap.dedent(manifest),
        encoding="utf-8",
    )
    return folder


def event(
    topic: str = "test/dev1",
    payload: dict[str, Any] | None = None,
    raw: bytes | None = None,
    hops: int = 0,
) -> Event:
    """Return an event as ingest would make it."""
    import orjson

    body = payload if payload is not None else {"n": 1}
    return Event(
        id=new_event_id(),
        topic=topic,
        device_id=topic.split("/")[1] if "/" in topic else None,
        payload=body,
        raw=raw if raw is not None else orjson.dumps(body),
        received_at=time.time(),
        source="mqtt",
        hops=hops,
    )
