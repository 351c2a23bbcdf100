"""The host imports of ABI 1 (module ``flux``): ``log`` and ``emit``.

The functions are defined once per ``Linker`` (one per plugin) and find the instance they
serve through a thread-local set for the duration of a call: a call runs on one thread, and
one instance is never called from two threads at once.
"""

from __future__ import annotations

import threading
from typing import Protocol

import wasmtime

#: name -> (params, results), as the module must import them.
HOST_IMPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "log": (("i32", "i32", "i32"), ()),
    "emit": (("i32", "i32", "i32", "i32"), ()),
}


class HostTarget(Protocol):
    """What an instance offers the host imports while it is being called."""

    def host_log(self, caller: wasmtime.Caller, level: int, ptr: int, length: int) -> None: ...

    def host_emit(
        self,
        caller: wasmtime.Caller,
        topic_ptr: int,
        topic_len: int,
        payload_ptr: int,
        payload_len: int,
    ) -> None: ...

    def host_failed(self, message: str) -> None: ...


class _Current(threading.local):
    target: HostTarget | None = None


current = _Current()


def _log(caller: wasmtime.Caller, level: int, ptr: int, length: int) -> None:
    target = current.target
    if target is not None:
        try:
            target.host_log(caller, level, ptr, length)
        except Exception as exc:  # never raise into wasm: fail the call afterwards
            target.host_failed(f"log() failed: {exc!r}")


def _emit(
    caller: wasmtime.Caller, topic_ptr: int, topic_len: int, payload_ptr: int, payload_len: int
) -> None:
    target = current.target
    if target is not None:
        try:
            target.host_emit(caller, topic_ptr, topic_len, payload_ptr, payload_len)
        except Exception as exc:  # never raise into wasm: fail the call afterwards
            target.host_failed(f"emit() failed: {exc!r}")


def define_host_imports(linker: wasmtime.Linker) -> None:
    """Define ``flux.log`` and ``flux.emit`` in ``linker``; they never raise into wasm."""
    i32 = wasmtime.ValType.i32()
    linker.define_func(
        "flux", "log", wasmtime.FuncType([i32, i32, i32], []), _log, access_caller=True
    )
    linker.define_func(
        "flux", "emit", wasmtime.FuncType([i32, i32, i32, i32], []), _emit, access_caller=True
    )


__all__ = ["HOST_IMPORTS", "HostTarget", "current", "define_host_imports"]
