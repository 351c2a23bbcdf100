"""One warm plugin instance: a ``Store`` with limits, the instantiated module, a fast call path.

wasmtime-py's ``Func.__call__`` asks the engine for the function's type and converts every
argument and result through ``Val`` on each call, many times the cost of the call itself.
Signatures are validated once at load (``runtime.validate_module``), so this module calls
``wasmtime_func_call_unchecked`` directly through ctypes with a preallocated raw-value array
and integer addresses. The input buffer is allocated once through ``flux_alloc`` and reused for
every call until a larger message arrives.

Not thread-safe: one instance serves one call at a time (the pool guarantees it); wasmtime
releases the GIL during the call, so different instances may run on different threads.
"""

from __future__ import annotations

import ctypes
import logging
import time
from typing import Any, NamedTuple

import orjson
import wasmtime
from wasmtime import _bindings as _b
from wasmtime import _ffi as ffi

from flux.plugins import _host
from flux.plugins.errors import (
    PluginError,
    PluginLimitExceeded,
    PluginLoadError,
    PluginOutputError,
    PluginRejected,
    PluginTimeout,
    PluginTrap,
)
from flux.plugins.manifest import ABI_VERSION
from flux.plugins.runtime import PluginRuntime

_DLL: Any = vars(_b)["dll"]
_c_void_p = ctypes.c_void_p
_c_size_t = ctypes.c_size_t
_c_uint64 = ctypes.c_uint64

# Private prototypes bound to the same C symbols as wasmtime-py's bindings, declared with
# plain integer (c_void_p) arguments so ctypes does no per-call type conversion. CFUNCTYPE
# functions release the GIL while the C function (and the wasm it runs) executes.
_call_unchecked = ctypes.CFUNCTYPE(
    _c_void_p, _c_void_p, _c_void_p, _c_void_p, _c_size_t, _c_void_p
)(("wasmtime_func_call_unchecked", _DLL))
_set_fuel = ctypes.CFUNCTYPE(_c_void_p, _c_void_p, _c_uint64)(("wasmtime_context_set_fuel", _DLL))
_set_epoch_deadline = ctypes.CFUNCTYPE(None, _c_void_p, _c_uint64)(
    ("wasmtime_context_set_epoch_deadline", _DLL)
)
_memory_data = ctypes.CFUNCTYPE(_c_void_p, _c_void_p, _c_void_p)(("wasmtime_memory_data", _DLL))
_memory_size = ctypes.CFUNCTYPE(_c_size_t, _c_void_p, _c_void_p)(
    ("wasmtime_memory_data_size", _DLL)
)

_string_at = ctypes.string_at
_memmove = ctypes.memmove
_loads = orjson.loads
_MASK32 = 0xFFFF_FFFF
_WASM_PAGE = 65_536
_ARGS_LEN = 2
_LOG_LINES_PER_CALL = 32
_LOG_LINE_BYTES = 1024
_LOG_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)


class PluginOutput(NamedTuple):
    """One output of a call: a topic (``None``: the manifest's ``output_topic``), a JSON
    object payload, and the index of the input message it belongs to (batches)."""

    topic: str | None
    payload: dict[str, Any]
    parent: int


class PluginRejection(NamedTuple):
    """One message of a batch the plugin refused (``{"index": i, "error": reason}``)."""

    parent: int
    reason: str


def _address(obj: Any) -> int:
    return ctypes.addressof(obj)


def _per_message(count: int) -> str:
    """How a limit message names the batch scaling (empty for one message)."""
    return f" per message, x{count} for this batch" if count > 1 else ""


def _rejection(item: Any, count: int) -> PluginRejection | None:
    """Read ``{"index": i, "error": reason}`` (no payload): message ``i`` refused."""
    if not isinstance(item, dict) or "error" not in item or "payload" in item:
        return None
    index = item.get("index", 0)
    if type(index) is not int or not 0 <= index < count:
        return None
    return PluginRejection(index, str(item["error"])[:500])


class PluginInstance:
    """A ``Store`` + instance of one plugin, with its own input buffer and execution count."""

    def __init__(self, runtime: PluginRuntime, *, instance_id: int, generation: int = 0) -> None:
        self.runtime = runtime
        self.plugin = runtime.name
        self.id = instance_id
        self.generation = generation
        self.created_at = time.time()
        self.executions = 0
        #: Why this instance must not be reused (``trap``, ``timeout``, ``limit``, ``error``).
        self.failure: str | None = None
        manifest = runtime.manifest
        self._limits = manifest.limits
        self._log = logging.getLogger(f"flux.plugins.{self.plugin}")
        self._max_outputs = manifest.limits.max_outputs
        self._max_output_bytes = manifest.limits.max_output_bytes
        self._memory_cap = manifest.limits.max_memory_bytes
        self._uses_fuel = manifest.limits.uses_fuel
        self._fuel = runtime.fuel_per_message
        self._ticks = runtime.epoch_ticks

        store = runtime.new_store()
        instance = runtime.instantiate(store)
        exports = instance.exports(store)
        self._store: wasmtime.Store | None = store
        self._instance = instance
        memory = exports["memory"]
        assert isinstance(memory, wasmtime.Memory)  # checked by validate_module
        self._memory = memory
        self._funcs: list[wasmtime.Func] = []  # keeps the func structs alive for addresses
        self._ctx = int(ctypes.cast(store._context(), _c_void_p).value or 0)
        self._mem = _address(memory._memory)
        self._args = (ffi.wasmtime_val_raw_t * 2)()
        self._args_addr = _address(self._args)
        self._trap = _c_void_p()
        self._trap_addr = _address(self._trap)
        names = runtime.exports
        self._alloc = self._func(exports, "flux_alloc")
        self._on_msg = self._func(exports, names.on_msg) if names.on_msg else 0
        self._on_batch = self._func(exports, names.on_batch) if names.on_batch else 0
        self._free = self._func(exports, names.free) if names.free else 0
        self._in_ptr = 0
        self._in_cap = 0
        # Per-call state: host imports, the limits of this call (per message, times the
        # batch), and the batch's rejected messages.
        self._emitted: list[PluginOutput] = []
        self._emitted_bytes = 0
        self._call_max_outputs = self._max_outputs
        self._call_max_bytes = self._max_output_bytes
        #: Messages of the last batch call the plugin refused, each with its reason.
        self.rejected: list[PluginRejection] = []
        self._host_error: str | None = None
        self._log_lines = 0
        if names.abi_version:
            version = self._invoke(self._func(exports, names.abi_version), 0, budget=1) & _MASK32
            if version != ABI_VERSION:
                self.close()
                raise PluginLoadError(
                    f"flux_abi_version() returned {version}; this host implements {ABI_VERSION}",
                    plugin=self.plugin,
                    key="exports.flux_abi_version",
                )

    def _func(self, exports: Any, name: str) -> int:
        func = exports[name]
        assert isinstance(func, wasmtime.Func)  # checked by validate_module
        self._funcs.append(func)
        return _address(func._func)

    # -- state -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Return whether the instance's store has been released."""
        return self._store is None

    def memory_bytes(self) -> int:
        """Return the current size of the instance's linear memory."""
        if self._store is None:
            return 0
        return int(_memory_size(self._ctx, self._mem))

    def close(self) -> None:
        """Release the store (and the instance's memory) now rather than at garbage collection."""
        store, self._store = self._store, None
        self._funcs.clear()
        if store is not None:
            store.close()

    # -- calls -----------------------------------------------------------------------------

    @property
    def has_batch(self) -> bool:
        """Return whether the plugin exports a batch entry point."""
        return bool(self._on_batch)

    @property
    def has_msg(self) -> bool:
        """Return whether the plugin exports a single-message entry point."""
        return bool(self._on_msg)

    def call(self, data: bytes, *, batch: bool = False, count: int = 1) -> list[PluginOutput]:
        """Run ``on_msg`` (or ``on_batch`` over ``count`` messages) on ``data``; return outputs.

        Fuel, ``max_outputs`` and ``max_output_bytes`` are per message: a batch of ``count``
        gets ``count`` times each. Messages of a batch the plugin refused one by one are in
        ``rejected`` afterwards. Raises a ``PluginError``; after a trap, timeout, limit or
        output error ``failure`` is set and the instance must be recycled.
        ``PluginRejected`` (the whole input refused) leaves it healthy.
        """
        if self._store is None or self.failure is not None:
            raise PluginError("instance is closed", plugin=self.plugin)
        entry = self._on_batch if batch else self._on_msg
        if not entry:
            kind = "on_batch" if batch else "on_msg"
            raise PluginError(f"does not export {kind}", plugin=self.plugin)
        self.executions += 1
        size = len(data)
        if size > self._in_cap:
            self._grow_input(size)
        _memmove(_memory_data(self._ctx, self._mem) + self._in_ptr, data, size)
        args = self._args
        args[0].i32 = self._in_ptr
        args[1].i32 = size
        self._emitted = []
        self._emitted_bytes = 0
        self._call_max_outputs = max_outputs = self._max_outputs * count
        self._call_max_bytes = max_bytes = self._max_output_bytes * count
        self.rejected = []
        self._host_error = None
        self._log_lines = 0
        previous, _host.current.target = _host.current.target, self
        try:
            packed = self._invoke(entry, 2, budget=count)
        finally:
            _host.current.target = previous
        memory_size = _memory_size(self._ctx, self._mem)
        if memory_size + _WASM_PAGE > self._memory_cap:
            self.failure = "limit"
            raise PluginLimitExceeded(
                f"linear memory reached limits.max_memory_bytes ({self._memory_cap} bytes)",
                plugin=self.plugin,
                limit="memory",
            )
        if self._host_error is not None:
            self.failure = "error"
            raise PluginOutputError(self._host_error, plugin=self.plugin)
        outputs = self._emitted
        if packed:
            packed &= 0xFFFF_FFFF_FFFF_FFFF
            ptr, length = packed >> 32, packed & _MASK32
            if ptr + length > memory_size:
                self.failure = "error"
                raise PluginOutputError(
                    f"output [{ptr}, {ptr + length}) is outside linear memory ({memory_size} "
                    "bytes)",
                    plugin=self.plugin,
                )
            if length + self._emitted_bytes > max_bytes:
                self.failure = "error"
                raise PluginOutputError(
                    f"output is {length} bytes; limits.max_output_bytes is "
                    f"{self._max_output_bytes}{_per_message(count)}",
                    plugin=self.plugin,
                )
            blob = _string_at(_memory_data(self._ctx, self._mem) + ptr, length)
            outputs = outputs + self._parse(blob, count)
        if len(outputs) > max_outputs:
            self.failure = "error"
            raise PluginOutputError(
                f"{len(outputs)} outputs; limits.max_outputs is {self._max_outputs}"
                f"{_per_message(count)}",
                plugin=self.plugin,
            )
        if self.rejected and not batch:
            raise PluginRejected(self.rejected[0].reason, plugin=self.plugin)
        return outputs

    def _grow_input(self, size: int) -> None:
        capacity = max(size, 2 * self._in_cap, 1024)
        capacity = (capacity + 7) & ~7
        if self._in_cap and self._free:
            args = self._args
            args[0].i32 = self._in_ptr
            args[1].i32 = self._in_cap
            self._invoke(self._free, 2, budget=1)
            self._in_cap = 0
        self._args[0].i32 = capacity
        ptr = self._invoke(self._alloc, 1, budget=1) & _MASK32
        if ptr == 0:
            self.failure = "limit"
            raise PluginLimitExceeded(
                f"flux_alloc({capacity}) returned 0", plugin=self.plugin, limit="memory"
            )
        if ptr + capacity > _memory_size(self._ctx, self._mem):
            self.failure = "error"
            raise PluginOutputError(
                f"flux_alloc({capacity}) returned {ptr}, outside linear memory", plugin=self.plugin
            )
        self._in_ptr = ptr
        self._in_cap = capacity

    def _invoke(self, func: int, nargs: int, *, budget: int) -> int:
        """Call ``func`` with its ``nargs`` arguments already in ``_args``; return result 0.

        The raw array is passed whole (2 slots): ``wasmtime_func_call_unchecked`` needs room
        for max(params, results), and every ABI 1 export fits in two.
        """
        if self._uses_fuel:
            _set_fuel(self._ctx, self._fuel * budget)
        else:
            _set_epoch_deadline(self._ctx, self._ticks)
        error = _call_unchecked(self._ctx, func, self._args_addr, _ARGS_LEN, self._trap_addr)
        if error or self._trap.value:
            raise self._fault(error)
        return int(self._args[0].i64)

    def _fault(self, error: int | None) -> PluginError:
        """Turn a trap or error from a call into the named error; mark the instance failed."""
        trap_ptr, self._trap.value = self._trap.value, None
        code: wasmtime.TrapCode | None = None
        if trap_ptr:
            trap = wasmtime.Trap._from_ptr(ctypes.cast(trap_ptr, ctypes.POINTER(ffi.wasm_trap_t)))
            message, code = trap.message, trap.trap_code
        else:
            err = wasmtime.WasmtimeError._from_ptr(
                ctypes.cast(error or 0, ctypes.POINTER(ffi.wasmtime_error_t))
            )
            message = str(err)
        first = message.strip().splitlines()[0] if message.strip() else "trap"
        if code in (wasmtime.TrapCode.OUT_OF_FUEL, wasmtime.TrapCode.INTERRUPT):
            self.failure = "timeout"
            budget = f"fuel {self._fuel}" if self._uses_fuel else f"{self._limits.timeout_ms} ms"
            return PluginTimeout(f"exceeded its budget ({budget}): {first}", plugin=self.plugin)
        if code is wasmtime.TrapCode.STACK_OVERFLOW:
            self.failure = "limit"
            return PluginLimitExceeded(
                f"exceeded limits.max_stack_bytes ({self._limits.max_stack_bytes}): {first}",
                plugin=self.plugin,
                limit="stack",
            )
        if (
            code is wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS
            and _memory_size(self._ctx, self._mem) + _WASM_PAGE > self._memory_cap
        ):
            self.failure = "limit"
            return PluginLimitExceeded(
                f"ran out of memory at limits.max_memory_bytes ({self._memory_cap}): {first}",
                plugin=self.plugin,
                limit="memory",
            )
        self.failure = "trap"
        name = code.name.lower() if code is not None else "error"
        return PluginTrap(f"trapped: {first}", plugin=self.plugin, trap=name)

    def _parse(self, blob: bytes, count: int) -> list[PluginOutput]:
        """Decode the returned JSON: an array of outputs, or ``{"error": ...}`` to reject."""
        try:
            value = _loads(blob)
        except orjson.JSONDecodeError as exc:
            self.failure = "error"
            raise PluginOutputError(f"output is not JSON: {exc}", plugin=self.plugin) from None
        if isinstance(value, dict):
            if "error" in value:
                raise PluginRejected(str(value["error"])[:500], plugin=self.plugin)
            value = [value]
        if not isinstance(value, list):
            self.failure = "error"
            raise PluginOutputError("output must be a JSON array of objects", plugin=self.plugin)
        outputs: list[PluginOutput] = []
        for position, item in enumerate(value):
            rejection = _rejection(item, count)
            if rejection is not None:
                self.rejected.append(rejection)
                continue
            output = self._output(item, count)
            if output is None:
                self.failure = "error"
                raise PluginOutputError(
                    f'output {position} must be {{"topic"?: string, "payload": object, '
                    f'"index"?: 0..{count - 1}}}',
                    plugin=self.plugin,
                )
            outputs.append(output)
        return outputs

    @staticmethod
    def _output(item: Any, count: int) -> PluginOutput | None:
        if not isinstance(item, dict):
            return None
        payload = item.get("payload")
        topic = item.get("topic")
        index = item.get("index", 0)
        if (
            not isinstance(payload, dict)
            or not (topic is None or isinstance(topic, str))
            or type(index) is not int
            or not 0 <= index < count
        ):
            return None
        return PluginOutput(topic or None, payload, index)

    # -- host imports ----------------------------------------------------------------------

    def _read(self, caller: wasmtime.Caller, ptr: int, length: int) -> bytes | None:
        ctx = int(ctypes.cast(caller._context(), _c_void_p).value or 0)
        if ptr + length > _memory_size(ctx, self._mem):
            return None
        return _string_at(_memory_data(ctx, self._mem) + ptr, length)

    def host_failed(self, message: str) -> None:
        """Record a host-import failure; the call raises ``PluginOutputError`` once it returns."""
        self._host_error = self._host_error or message

    def host_log(self, caller: wasmtime.Caller, level: int, ptr: int, length: int) -> None:
        """``flux.log``: write one line to ``flux.plugins.<name>`` (bounded per call)."""
        self._log_lines += 1
        if self._log_lines > _LOG_LINES_PER_CALL:
            return
        text = self._read(caller, ptr & _MASK32, min(length & _MASK32, _LOG_LINE_BYTES))
        if text is None:
            self._host_error = self._host_error or "log() pointer is outside linear memory"
            return
        self._log.log(_LOG_LEVELS[min(max(level, 0), 3)], "%s", text.decode("utf-8", "replace"))

    def host_emit(
        self,
        caller: wasmtime.Caller,
        topic_ptr: int,
        topic_len: int,
        payload_ptr: int,
        payload_len: int,
    ) -> None:
        """``flux.emit``: record one output; a bad one fails the call after it returns."""
        if self._host_error is not None:
            return
        topic_len &= _MASK32
        payload_len &= _MASK32
        if len(self._emitted) >= self._call_max_outputs:
            self._host_error = f"more than limits.max_outputs ({self._call_max_outputs}) emits"
            return
        self._emitted_bytes += topic_len + payload_len
        if self._emitted_bytes > self._call_max_bytes:
            self._host_error = f"emitted more than limits.max_output_bytes ({self._call_max_bytes})"
            return
        topic = self._read(caller, topic_ptr & _MASK32, topic_len)
        payload = self._read(caller, payload_ptr & _MASK32, payload_len)
        if topic is None or payload is None:
            self._host_error = "emit() pointer is outside linear memory"
            return
        try:
            topic_text = topic.decode("utf-8")
            value = _loads(payload)
        except (UnicodeDecodeError, orjson.JSONDecodeError) as exc:
            self._host_error = f"emit() with a bad topic or payload: {exc}"
            return
        if not isinstance(value, dict) or "+" in topic_text or "#" in topic_text:
            self._host_error = "emit() payload must be a JSON object and topic concrete"
            return
        self._emitted.append(PluginOutput(topic_text or None, value, 0))


__all__ = ["PluginInstance", "PluginOutput", "PluginRejection"]
