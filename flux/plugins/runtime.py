"""Compile, cache and link one plugin: its ``Engine``, its ``Module`` and its host imports.

One ``PluginRuntime`` exists per loaded plugin version. It owns a wasmtime ``Engine``
configured from the manifest (fuel or epoch interruption, the wasm stack limit), the compiled
``Module`` (from the on-disk cache when the gateway compiled it before), and an ``InstancePre``
with the host imports already resolved, so creating an instance is one cheap call.

The module cache only deserializes files the gateway wrote itself: the cache directory must be
owned by this user and not writable by anyone else, and every entry carries an HMAC-SHA256 of
its bytes under a random key kept in that directory (mode 0600). A cached artifact is native
code, so a file that fails any of these checks is deleted and the module compiled again.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.metadata
import logging
import os
import stat
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import wasmtime

from flux.plugins._host import HOST_IMPORTS, define_host_imports
from flux.plugins.errors import PluginLimitExceeded, PluginLoadError, PluginTrap
from flux.plugins.manifest import PluginManifest

log = logging.getLogger(__name__)

WASMTIME_VERSION = importlib.metadata.version("wasmtime")

#: Epoch ticker period; ``limits.timeout_ms`` is rounded up to whole ticks (plus one).
EPOCH_TICK_S = 0.005

_HMAC_SIZE = 32
_WASI_MODULES = frozenset({"wasi_snapshot_preview1", "wasi_unstable"})

#: Exports of ABI 1: name -> (params, results). ``on_msg``/``on_batch`` may be renamed.
_ALLOC_SIG = (("i32",), ("i32",))
_FREE_SIG = (("i32", "i32"), ())
_ENTRY_SIG = (("i32", "i32"), ("i64",))
_ABI_SIG = ((), ("i32",))


def default_cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/flux/modules`` (``~/.cache/flux/modules`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flux" / "modules"


class _EpochTicker:
    """Advance the epoch of every engine that uses epoch deadlines, every ``EPOCH_TICK_S``."""

    def __init__(self) -> None:
        self._engines: weakref.WeakSet[wasmtime.Engine] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def register(self, engine: wasmtime.Engine) -> None:
        with self._lock:
            self._engines.add(engine)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="flux-plugin-epoch", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        wake = threading.Event()
        while True:
            wake.wait(EPOCH_TICK_S)
            with self._lock:
                engines = list(self._engines)
            for engine in engines:
                engine.increment_epoch()


EPOCH_TICKER = _EpochTicker()


def _engine_for(manifest: PluginManifest) -> tuple[wasmtime.Engine, str]:
    """Build the engine for a manifest and return it with a fingerprint of its settings."""
    limits = manifest.limits
    config = wasmtime.Config()
    config.consume_fuel = limits.uses_fuel
    config.epoch_interruption = not limits.uses_fuel
    config.max_wasm_stack = limits.max_stack_bytes
    config.cranelift_opt_level = "speed"
    fingerprint = (
        f"wasmtime={WASMTIME_VERSION};fuel={limits.uses_fuel};"
        f"stack={limits.max_stack_bytes};opt=speed"
    )
    engine = wasmtime.Engine(config)
    if not limits.uses_fuel:
        EPOCH_TICKER.register(engine)
    return engine, fingerprint


CacheOutcome = Literal["hit", "compiled", "uncached"]


@dataclass(frozen=True, slots=True)
class ModuleLoad:
    """How a module was obtained and how long it took."""

    outcome: CacheOutcome
    seconds: float
    wasm_sha256: str


class ModuleCache:
    """Serialized compiled modules on disk, keyed by the wasm's hash and the engine settings.

    ``directory=None`` disables the cache (every load compiles).
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._key: bytes | None = None
        self._lock = threading.Lock()
        self.disabled_reason = "" if directory is not None else "no cache directory"

    def _prepare(self) -> bytes | None:
        """Create or check the private directory and its HMAC key; ``None`` if unusable."""
        if self._key is not None or self.directory is None or self.disabled_reason:
            return self._key
        directory = self.directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = directory.stat()
            if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                self.disabled_reason = f"{directory} is not private to this user"
                log.warning("module cache disabled: %s", self.disabled_reason)
                return None
            key_path = directory / "cache.key"
            try:
                fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                key_info = key_path.stat()
                if key_info.st_uid != os.getuid() or key_info.st_mode & 0o077:
                    self.disabled_reason = f"{key_path} is not private to this user"
                    log.warning("module cache disabled: %s", self.disabled_reason)
                    return None
                key = key_path.read_bytes()
            else:
                key = os.urandom(32)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(key)
            if len(key) != 32:
                self.disabled_reason = f"{key_path} is not a 32-byte key"
                log.warning("module cache disabled: %s", self.disabled_reason)
                return None
        except OSError as exc:
            self.disabled_reason = f"{directory}: {exc}"
            log.warning("module cache disabled: %s", self.disabled_reason)
            return None
        self._key = key
        return key

    def entry_path(self, wasm_sha256: str, fingerprint: str) -> Path | None:
        """Return where the artifact for this wasm and engine fingerprint lives."""
        if self.directory is None:
            return None
        settings = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        return self.directory / f"{wasm_sha256}-{settings}.cwasm"

    def load(
        self, engine: wasmtime.Engine, wasm: bytes, fingerprint: str
    ) -> tuple[wasmtime.Module, ModuleLoad]:
        """Return the compiled module: deserialized when a verified entry exists, else compiled
        (and then stored). Raises ``wasmtime.WasmtimeError`` if the bytes are not valid wasm."""
        started = time.perf_counter()
        digest = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            key = self._prepare()
        path = self.entry_path(digest, fingerprint)
        if key is not None and path is not None:
            module = self._read(engine, path, key)
            if module is not None:
                return module, ModuleLoad("hit", time.perf_counter() - started, digest)
        module = wasmtime.Module(engine, wasm)
        seconds = time.perf_counter() - started
        if key is not None and path is not None:
            self._write(path, key, module.serialize())
            return module, ModuleLoad("compiled", seconds, digest)
        return module, ModuleLoad("uncached", seconds, digest)

    @staticmethod
    def _read(engine: wasmtime.Engine, path: Path, key: bytes) -> wasmtime.Module | None:
        try:
            info = path.lstat()
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                raise ValueError("not a regular file owned by this user")
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("module cache entry %s rejected: %s", path, exc)
            path.unlink(missing_ok=True)
            return None
        mac, body = blob[:_HMAC_SIZE], blob[_HMAC_SIZE:]
        expected = hmac.new(key, body, hashlib.sha256).digest()
        if len(mac) != _HMAC_SIZE or not hmac.compare_digest(mac, expected):
            log.warning("module cache entry %s failed its HMAC check; recompiling", path)
            path.unlink(missing_ok=True)
            return None
        try:
            return wasmtime.Module.deserialize(engine, body)
        except wasmtime.WasmtimeError as exc:
            log.info("module cache entry %s is stale (%s); recompiling", path, exc)
            path.unlink(missing_ok=True)
            return None

    @staticmethod
    def _write(path: Path, key: bytes, body: bytes | bytearray) -> None:
        mac = hmac.new(key, body, hashlib.sha256).digest()
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".cwasm")
            with os.fdopen(fd, "wb") as handle:
                handle.write(mac)
                handle.write(body)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("module cache entry %s not written: %s", path, exc)


@dataclass(frozen=True, slots=True)
class Exports:
    """Export names validated at load; ``None`` where the optional export is absent."""

    on_msg: str | None
    on_batch: str | None
    free: str | None
    abi_version: str | None


def _sig(ty: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results)


def _fmt(sig: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    params, results = sig
    return f"({', '.join(params)}) -> ({', '.join(results)})"


def validate_module(manifest: PluginManifest, module: wasmtime.Module) -> Exports:
    """Check imports and exports against ABI 1 once; raise ``PluginLoadError`` naming the item."""
    name = manifest.name
    for imp in module.imports:
        where = f"{imp.module}.{imp.name}"
        if imp.module == "flux":
            expected = HOST_IMPORTS.get(imp.name or "")
            if expected is None:
                raise PluginLoadError(
                    f"imports {where}, which the host does not provide "
                    f"(ABI 1 has flux.{', flux.'.join(HOST_IMPORTS)})",
                    plugin=name,
                    key="imports",
                )
            if not isinstance(imp.type, wasmtime.FuncType) or _sig(imp.type) != expected:
                raise PluginLoadError(
                    f"imports {where} with the wrong signature; ABI 1 has {_fmt(expected)}",
                    plugin=name,
                    key="imports",
                )
        elif imp.module in _WASI_MODULES:
            if not manifest.wasi:
                raise PluginLoadError(
                    f"imports {where} but the manifest does not declare wasi = true",
                    plugin=name,
                    key="wasi",
                )
        else:
            raise PluginLoadError(
                f"imports {where}; only 'flux' (and WASI when declared) is provided",
                plugin=name,
                key="imports",
            )

    exports = {exp.name: exp.type for exp in module.exports}
    memory = exports.get("memory")
    if not isinstance(memory, wasmtime.MemoryType):
        raise PluginLoadError(
            "does not export a linear memory named 'memory'", plugin=name, key="exports.memory"
        )
    if memory.is_64:
        raise PluginLoadError("memory64 is not supported", plugin=name, key="exports.memory")

    def check(export: str, sig: tuple[tuple[str, ...], tuple[str, ...]], key: str) -> bool:
        ty = exports.get(export)
        if ty is None:
            return False
        if not isinstance(ty, wasmtime.FuncType) or _sig(ty) != sig:
            found = _fmt(_sig(ty)) if isinstance(ty, wasmtime.FuncType) else type(ty).__name__
            raise PluginLoadError(
                f"export {export!r} is {found}; ABI 1 requires {_fmt(sig)}", plugin=name, key=key
            )
        return True

    if not check("flux_alloc", _ALLOC_SIG, "exports.flux_alloc"):
        raise PluginLoadError(
            "does not export flux_alloc(i32) -> i32", plugin=name, key="exports.flux_alloc"
        )
    for key, export in (
        ("exports.on_msg", manifest.exports.on_msg),
        ("exports.on_batch", manifest.exports.on_batch),
    ):
        if export is not None and not check(export, _ENTRY_SIG, key):
            raise PluginLoadError(
                f"manifest names entry {export!r} but the module does not export it",
                plugin=name,
                key=key,
            )
    has_free = check("flux_free", _FREE_SIG, "exports.flux_free")
    has_abi = check("flux_abi_version", _ABI_SIG, "exports.flux_abi_version")
    return Exports(
        on_msg=manifest.exports.on_msg,
        on_batch=manifest.exports.on_batch,
        free="flux_free" if has_free else None,
        abi_version="flux_abi_version" if has_abi else None,
    )


class PluginRuntime:
    """The compiled, validated, linked form of one plugin version; makes instances.

    Thread-safe: ``new_instance`` may be called from any thread (each instance gets its own
    ``Store``; the engine, module and ``InstancePre`` are shared and immutable).
    """

    def __init__(self, *, manifest: PluginManifest, cache: ModuleCache) -> None:
        self.manifest = manifest
        self.name = manifest.name
        try:
            wasm = manifest.wasm_path.read_bytes()
        except OSError as exc:
            raise PluginLoadError(str(exc), plugin=self.name, key="wasm") from None
        self.engine, self.fingerprint = _engine_for(manifest)
        try:
            self.module, self.load_info = cache.load(self.engine, wasm, self.fingerprint)
        except wasmtime.WasmtimeError as exc:
            raise PluginLoadError(
                f"{manifest.wasm_path.name} is not a valid module: {exc}",
                plugin=self.name,
                key="wasm",
            ) from None
        self.exports = validate_module(manifest, self.module)
        linker = wasmtime.Linker(self.engine)
        if manifest.wasi:
            linker.define_wasi()
        define_host_imports(linker)
        try:
            self.instance_pre = linker.instantiate_pre(self.module)
        except wasmtime.WasmtimeError as exc:
            raise PluginLoadError(f"cannot link: {exc}", plugin=self.name) from None
        self._linker = linker
        limits = manifest.limits
        self.fuel_per_message = limits.fuel_per_message
        self.epoch_ticks = (
            0
            if limits.timeout_ms is None
            else int(limits.timeout_ms / 1000 / EPOCH_TICK_S + 0.999_999) + 1
        )

    @property
    def wasm_sha256(self) -> str:
        """Return the hex SHA-256 of the module bytes (the cache key and the version id)."""
        return self.load_info.wasm_sha256

    def new_store(self) -> wasmtime.Store:
        """Return a ``Store`` with this plugin's limits applied (and an empty WASI if declared)."""
        limits = self.manifest.limits
        store = wasmtime.Store(self.engine)
        store.set_limits(
            memory_size=limits.max_memory_bytes,
            table_elements=limits.max_table_elements,
            instances=1,
            tables=4,
            memories=1,
        )
        if self.manifest.wasi:
            # No preopened directories, no environment, no arguments, no inherited stdio:
            # a WASI plugin gets clocks and random, nothing that reaches the host.
            store.set_wasi(wasmtime.WasiConfig())
        return store

    def instantiate(self, store: wasmtime.Store) -> wasmtime.Instance:
        """Instantiate into ``store`` with a start-up budget; map failures to named errors."""
        if self.manifest.limits.uses_fuel:
            store.set_fuel(self.fuel_per_message)
        else:
            store.set_epoch_deadline(self.epoch_ticks)
        try:
            return self.instance_pre.instantiate(store)
        except wasmtime.Trap as exc:
            raise PluginTrap(
                f"trapped while starting: {exc.message}", plugin=self.name, trap="start"
            ) from None
        except wasmtime.WasmtimeError as exc:
            text = str(exc)
            if "memory" in text and ("limit" in text or "maximum" in text or "size" in text):
                raise PluginLimitExceeded(
                    f"initial memory is above limits.max_memory_bytes: {text.splitlines()[0]}",
                    plugin=self.name,
                    limit="memory",
                ) from None
            raise PluginLoadError(f"cannot instantiate: {text}", plugin=self.name) from None


__all__ = [
    "EPOCH_TICK_S",
    "HOST_IMPORTS",
    "WASMTIME_VERSION",
    "Exports",
    "ModuleCache",
    "ModuleLoad",
    "PluginRuntime",
    "default_cache_dir",
    "validate_module",
]
