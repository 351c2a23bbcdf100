"""``PluginManager``: every plugin in ``plugins/``, its pool, calls, stats, restart and reload.

The manager is the one object the rest of the gateway talks to; it runs on the event loop.

Where calls run: a hop to a thread pool costs far more than a typical plugin call, while
CPU-heavy calls do run in parallel on threads (wasmtime releases the GIL). So calls run
inline on the loop by default and a plugin whose calls are heavy opts into the thread pool
(``[pool] executor = "thread"``); ``call_many`` and ``call_batch`` amortize the hop either
way. The figures are in the README's Benchmarks section.

Reload builds and warms the new pool of every changed plugin first, then swaps the whole
table in one assignment; calls already running finish on the old pool, whose instances are
dropped as they come back, and calls waiting on it are retried on the new one. A plugin
whose new version fails to load keeps its old version and the failure is reported.
Concurrent reloads are coalesced.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import orjson

from flux.coalesce import Coalescer
from flux.config import PluginsConfig
from flux.events import Event, derive_event, device_id_for, new_event_id
from flux.plugins import metrics
from flux.plugins.errors import (
    PluginError,
    PluginHopLimit,
    PluginLoadError,
    PluginNotFound,
    PluginOutputError,
    PluginRejected,
    PoolClosed,
    PoolExhausted,
)
from flux.plugins.instance import PluginInstance, PluginOutput
from flux.plugins.manifest import MANIFEST_NAME, PluginManifest, load_manifest
from flux.plugins.pool import CallResult, InstancePool, PoolStats
from flux.plugins.runtime import ModuleCache, PluginRuntime, default_cache_dir
from flux.topics import CACHE_SIZE, topic_matches

log = logging.getLogger(__name__)

Executor = Literal["inline", "thread"]
_RETRIES_ON_RELOAD = 3
_u32 = struct.Struct("<I").pack


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """The result of one event in ``call_many``: its derived events, or the error."""

    event: Event
    outputs: list[Event]
    error: PluginError | None = None


@dataclass(slots=True)
class BatchOutcome:
    """What ``call_batch`` produced: the derived events, and each event that failed, with why."""

    outputs: list[Event] = field(default_factory=list)
    failed: list[tuple[Event, PluginError]] = field(default_factory=list)


@dataclass(slots=True)
class ReloadReport:
    """What a load or reload did, per plugin name."""

    loaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    errors: dict[str, PluginLoadError] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Return whether every plugin found on disk is running its current version."""
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (errors as their ``to_dict``)."""
        return {
            "loaded": self.loaded,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "kept_previous": self.kept,
            "errors": {name: err.to_dict() for name, err in self.errors.items()},
            "seconds": round(self.seconds, 6),
        }


@dataclass(frozen=True, slots=True)
class _Loaded:
    manifest: PluginManifest
    wasm_sha256: str
    pool: InstancePool


def encode_event(manifest: PluginManifest, event: Event) -> bytes:
    """Return the bytes ``on_msg`` receives: the JSON payload, or the raw bytes as received."""
    if manifest.input == "raw":
        return event.raw
    return orjson.dumps(event.payload)


def encode_batch(manifest: PluginManifest, events: Sequence[Event]) -> bytes:
    """Return the bytes ``on_batch`` receives: a JSON array of envelopes
    ``{"topic", "device_id", "payload"}``, or length-prefixed (u32 little-endian) raw frames
    back to back."""
    if manifest.input == "raw":
        return b"".join(_u32(len(e.raw)) + e.raw for e in events)
    return orjson.dumps(
        [{"topic": e.topic, "device_id": e.device_id, "payload": e.payload} for e in events]
    )


class PluginManager:
    """Loads the plugins of one directory and serves calls into their pools."""

    def __init__(
        self,
        *,
        plugins_dir: Path,
        cache_dir: Path | None = None,
        use_cache: bool = True,
        default_pool_size: int = 4,
        executor: Executor = "inline",
        max_workers: int = 2,
        max_hops: int = 8,
    ) -> None:
        self.plugins_dir = Path(plugins_dir)
        self.cache = ModuleCache((cache_dir or default_cache_dir()) if use_cache else None)
        self.default_pool_size = default_pool_size
        self.executor_mode: Executor = executor
        self.max_workers = max_workers
        self.max_hops = max_hops
        self._plugins: dict[str, _Loaded] = {}
        self._routes_for: dict[str, _Loaded] | None = None
        self._routes: dict[str, tuple[tuple[str, ...], bool]] = {}
        self._errors: dict[str, PluginLoadError] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._started = False
        self._closed = False
        self._reloads: Coalescer[ReloadReport] = Coalescer()

    @classmethod
    def from_config(cls, config: PluginsConfig) -> PluginManager:
        """A manager of the plugins in ``plugins.dir`` with the configured pools and cache."""
        return cls(
            plugins_dir=Path(config.dir),
            cache_dir=Path(config.cache_dir) if config.cache_dir else None,
            default_pool_size=config.pool_size,
            max_hops=config.max_hops,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> PluginManager:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> ReloadReport:
        """Load every plugin; a broken one is reported (``load_errors``) and left out."""
        if self._started:
            raise RuntimeError("PluginManager already started")
        self._started = True
        report = await self.reload()
        for name, error in report.errors.items():
            log.error("plugin %s not loaded: %s", name, error)
        return report

    async def close(self) -> None:
        """Close every pool (running calls finish; their instances are dropped on return)."""
        if self._closed:
            return
        self._closed = True
        plugins, self._plugins = self._plugins, {}
        for loaded in plugins.values():
            loaded.pool.close()
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
            self._executor = None

    # -- discovery -------------------------------------------------------------------------------

    def names(self) -> frozenset[str]:
        """Return the names of the loaded plugins (rules validate ``plugin`` actions with it)."""
        return frozenset(self._plugins)

    def manifest(self, name: str) -> PluginManifest:
        """Return the manifest of a loaded plugin."""
        return self._get(name).manifest

    @property
    def load_errors(self) -> dict[str, PluginLoadError]:
        """Return the plugins on disk that are not running their current version, and why."""
        return dict(self._errors)

    def subscriptions(self) -> dict[str, tuple[str, ...]]:
        """Return each plugin's subscribed topic filters (empty: called only by rules)."""
        return {name: p.manifest.topics for name, p in self._plugins.items()}

    def plugins_for(self, topic: str) -> tuple[str, ...]:
        """Return the plugins whose topic filters match ``topic``, in name order."""
        return self._route(topic)[0]

    def wants_raw(self, topic: str) -> bool:
        """Return whether a raw-input plugin subscribes to ``topic``.

        Ingest uses it to turn a non-JSON message on such a topic into an event
        (``payload={}``, ``raw`` as received) instead of a dead letter.
        """
        return self._route(topic)[1]

    def _route(self, topic: str) -> tuple[tuple[str, ...], bool]:
        """Plugins for ``topic`` and whether one takes raw input; cached per topic, since
        every message asks. The cache belongs to one plugin table and goes with it."""
        if self._routes_for is not self._plugins:
            self._routes_for, self._routes = self._plugins, {}
        route = self._routes.get(topic)
        if route is None:
            matching = [
                (name, p.manifest.input == "raw")
                for name, p in sorted(self._plugins.items())
                if any(topic_matches(f, topic) for f in p.manifest.topics)
            ]
            route = (tuple(name for name, _ in matching), any(raw for _, raw in matching))
            if len(self._routes) >= CACHE_SIZE:
                self._routes.clear()
            self._routes[topic] = route
        return route

    def describe(self, name: str) -> dict[str, Any]:
        """Return a JSON-ready description of one plugin: manifest summary plus pool stats."""
        loaded = self._get(name)
        manifest = loaded.manifest
        limits = manifest.limits
        return {
            "name": manifest.name,
            "version": manifest.version,
            "description": manifest.description,
            "abi": manifest.abi,
            "input": manifest.input,
            "topics": list(manifest.topics),
            "output_topic": manifest.output_topic,
            "entry": {"on_msg": manifest.exports.on_msg, "on_batch": manifest.exports.on_batch},
            "limits": {
                "fuel": limits.fuel_per_message if limits.uses_fuel else None,
                "timeout_ms": limits.timeout_ms,
                "max_memory_bytes": limits.max_memory_bytes,
                "max_stack_bytes": limits.max_stack_bytes,
            },
            "recycle": {
                "after_executions": manifest.recycle.after_executions,
                "memory_high_water_bytes": manifest.memory_high_water_bytes,
            },
            "module": {
                "cache": loaded.pool.runtime.load_info.outcome,
                "load_seconds": loaded.pool.runtime.load_info.seconds,
            },
            "pool": loaded.pool.stats().as_dict(),
        }

    def describe_all(self) -> list[dict[str, Any]]:
        """Return ``describe`` for every loaded plugin, in name order."""
        return [self.describe(name) for name in sorted(self._plugins)]

    def stats(self, name: str) -> PoolStats:
        """Return one plugin's pool stats."""
        return self._get(name).pool.stats()

    def all_stats(self) -> dict[str, PoolStats]:
        """Return every plugin's pool stats."""
        return {name: p.pool.stats() for name, p in self._plugins.items()}

    def observe_memory(self) -> None:
        """Set ``flux_plugin_memory_bytes`` from each pool's idle instances (on the loop)."""
        for name, loaded in self._plugins.items():
            largest = loaded.pool.largest_idle_memory()
            if largest is not None:
                metrics.MEMORY.labels(name).set(largest)

    def _get(self, name: str) -> _Loaded:
        loaded = self._plugins.get(name)
        if loaded is None:
            raise PluginNotFound("no such plugin", plugin=name)
        return loaded

    # -- calls -----------------------------------------------------------------------------------

    async def call(self, name: str, event: Event) -> list[Event]:
        """Run the plugin on one event (``on_msg``, or a batch of one for a plugin with only
        ``on_batch``); return the events it emitted.

        Raises a ``PluginError`` (``PluginTrap``, ``PluginTimeout``, ``PluginLimitExceeded``,
        ``PluginOutputError``, ``PluginRejected``, ``PoolExhausted``, ...); the caller decides
        whether the event goes to the dead letters. The process is never at risk.
        """
        if self.manifest(name).exports.on_msg is None:
            outcome = await self.call_batch(name, [event])
            if outcome.failed:
                raise outcome.failed[0][1]
            return outcome.outputs
        hop_limit = self._hop_limit(name, event)
        if hop_limit is not None:
            raise hop_limit
        results, loaded = await self._run(name, lambda m: [encode_event(m, event)])
        result = results[0]
        if result.error is not None:
            raise result.error
        return self._derive(loaded.manifest, result.outputs, (event,))

    async def call_many(self, name: str, events: Sequence[Event]) -> list[CallOutcome]:
        """Run ``on_msg`` on each event with one instance lease (one thread hop); return one
        outcome per event, in order. A trap recycles the instance and the rest continue."""
        outcomes: dict[int, CallOutcome] = {}
        ready: list[Event] = []
        for position, event in enumerate(events):
            hop_limit = self._hop_limit(name, event)
            if hop_limit is None:
                ready.append(event)
            else:
                outcomes[position] = CallOutcome(event, [], hop_limit)
        if ready:
            results, loaded = await self._run(name, lambda m: [encode_event(m, e) for e in ready])
            called = iter(zip(ready, results, strict=True))
            for position in range(len(events)):
                if position not in outcomes:
                    event, result = next(called)
                    outcomes[position] = self._outcome(loaded.manifest, event, result)
        return [outcomes[position] for position in range(len(events))]

    def _outcome(self, manifest: PluginManifest, event: Event, result: CallResult) -> CallOutcome:
        if result.error is not None:
            return CallOutcome(event, [], result.error)
        try:
            return CallOutcome(event, self._derive(manifest, result.outputs, (event,)))
        except PluginOutputError as exc:
            return CallOutcome(event, [], exc)

    async def call_batch(self, name: str, events: Sequence[Event]) -> BatchOutcome:
        """Run the plugin over ``events``: its ``on_batch`` when it exports one (in calls of
        at most ``limits.max_batch`` events, fuel and output limits times the events), else
        ``on_msg`` per event; return the events emitted and the events that failed.

        A batch output may name the input it belongs to (``index``; default the first) or
        refuse one input (``{"index": i, "error": ...}``). A batch call that fails as a whole
        is retried in halves until the failing events are alone, so one bad event cannot
        take the rest of its batch to the dead letters.
        """
        outcome = BatchOutcome()
        ready: list[Event] = []
        for event in events:
            hop_limit = self._hop_limit(name, event)
            if hop_limit is None:
                ready.append(event)
            else:
                outcome.failed.append((event, hop_limit))
        if not ready:
            return outcome
        manifest = self.manifest(name)
        if manifest.exports.on_batch is None:
            for item in await self.call_many(name, ready):
                if item.error is None:
                    outcome.outputs.extend(item.outputs)
                else:
                    outcome.failed.append((item.event, item.error))
            return outcome
        size = manifest.limits.max_batch
        for start in range(0, len(ready), size):
            await self._batch(name, ready[start : start + size], outcome, first_try=True)
        return outcome

    async def _batch(
        self, name: str, events: Sequence[Event], outcome: BatchOutcome, *, first_try: bool
    ) -> None:
        """One ``on_batch`` call into ``outcome``; on failure, the same in two halves."""
        results, loaded = await self._run(
            name, lambda m: [encode_batch(m, events)], batch=True, count=len(events)
        )
        result = results[0]
        error = result.error
        if error is None:
            try:
                outcome.outputs.extend(self._derive(loaded.manifest, result.outputs, events))
            except PluginOutputError as exc:
                error = exc
            else:
                outcome.failed.extend(
                    (events[r.parent], PluginRejected(r.reason, plugin=name))
                    for r in result.rejected
                )
                return
        if len(events) == 1 or isinstance(error, PoolExhausted):
            outcome.failed.extend((event, error) for event in events)
            return
        if first_try:
            log.warning(
                "plugin %s: a batch of %d events failed (%s); retrying in halves to find "
                "the events that fail",
                name,
                len(events),
                error,
            )
        half = len(events) // 2
        await self._batch(name, events[:half], outcome, first_try=False)
        await self._batch(name, events[half:], outcome, first_try=False)

    async def test(self, name: str, data: bytes, *, topic: str | None = None) -> list[Event]:
        """Call a plugin on a sample message (``flux plugins test``); JSON input is parsed."""
        manifest = self.manifest(name)
        topic = topic or (
            manifest.topics[0].replace("+", "test").replace("#", "test")
            if manifest.topics
            else "test"
        )
        payload: dict[str, Any] = {}
        if manifest.input == "json":
            value = orjson.loads(data)
            if not isinstance(value, dict):
                raise PluginError("the sample payload must be a JSON object", plugin=name)
            payload = value
        event = Event(
            id=new_event_id(),
            topic=topic,
            device_id=device_id_for(topic, payload),
            payload=payload,
            raw=data,
            received_at=time.time(),
            source="derived",
        )
        return await self.call(name, event)

    def _hop_limit(self, name: str, event: Event) -> PluginHopLimit | None:
        """The error for an event that has passed too many hops (a plugin feeding itself)."""
        if event.hops < self.max_hops:
            return None
        return PluginHopLimit(
            f"event {event.id} has passed {event.hops} hops (max {self.max_hops}); "
            "is a plugin feeding itself?",
            plugin=name,
        )

    async def _run(
        self,
        name: str,
        encode: Callable[[PluginManifest], list[bytes]],
        *,
        batch: bool = False,
        count: int = 1,
    ) -> tuple[list[CallResult], _Loaded]:
        """Lease an instance (retrying on a pool replaced by reload), run, give it back."""
        for _ in range(_RETRIES_ON_RELOAD):
            loaded = self._get(name)
            pool = loaded.pool
            try:
                instance = await pool.acquire()
            except PoolClosed:
                continue
            payloads = encode(loaded.manifest)
            counts = [count] * len(payloads) if batch else None
            threaded = (loaded.manifest.pool.executor or self.executor_mode) == "thread"
            results, _ = await self._execute(pool, instance, payloads, batch, counts, threaded)
            return results, loaded
        raise PluginError("the plugin was reloaded repeatedly during the call", plugin=name)

    async def _execute(
        self,
        pool: InstancePool,
        instance: PluginInstance,
        payloads: list[bytes],
        batch: bool,
        counts: list[int] | None,
        threaded: bool,
    ) -> tuple[list[CallResult], PluginInstance | None]:
        if not threaded:
            try:
                results, final = pool.run(instance, payloads, batch=batch, counts=counts)
            except BaseException:
                pool.release(instance, instance)
                raise
            pool.release(instance, final, results)
            return results, final
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.max_workers, thread_name_prefix="flux-plugin"
            )
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self._executor, lambda: pool.run(instance, payloads, batch=batch, counts=counts)
        )
        try:
            results, final = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The worker still owns the instance: give it back when the call is over.
            def give_back(
                done: asyncio.Future[tuple[list[CallResult], PluginInstance | None]],
            ) -> None:
                if done.cancelled() or done.exception() is not None:
                    pool.release(instance, instance)
                else:
                    late_results, late_final = done.result()
                    pool.release(instance, late_final, late_results)

            future.add_done_callback(give_back)
            raise
        except BaseException:
            pool.release(instance, instance)
            raise
        pool.release(instance, final, results)
        return results, final

    def _derive(
        self, manifest: PluginManifest, outputs: Iterable[PluginOutput], parents: Sequence[Event]
    ) -> list[Event]:
        events: list[Event] = []
        for output in outputs:
            parent = parents[output.parent] if output.parent < len(parents) else parents[0]
            topic = output.topic or manifest.output_topic
            if topic is None:
                raise PluginOutputError(
                    "an output has no topic and the manifest has no output_topic",
                    plugin=manifest.name,
                )
            if "{device_id}" in topic:
                topic = topic.replace("{device_id}", parent.device_id or "unknown")
            try:
                events.append(derive_event(parent, topic=topic, payload=output.payload))
            except orjson.JSONEncodeError as exc:  # nested deeper than JSON is written back
                raise PluginOutputError(
                    f"an output cannot be written as JSON: {exc}", plugin=manifest.name
                ) from None
        return events

    # -- control ---------------------------------------------------------------------------------

    async def restart(self, name: str) -> PoolStats:
        """Replace every instance of a plugin (idle now, busy ones when they come back)."""
        pool = self._get(name).pool
        pool.restart()
        return pool.stats()

    async def reload(self) -> ReloadReport:
        """Re-read the plugin directory; build and warm changed plugins, then swap atomically.

        Two calls while a reload runs cause one more reload, not two.
        """
        if self._closed:
            raise RuntimeError("PluginManager is closed")
        return await self._reloads.run(self._reload_now)

    async def _reload_now(self) -> ReloadReport:
        started = time.perf_counter()
        report = ReloadReport()
        current = self._plugins
        found: dict[str, tuple[PluginManifest, str]] = {}
        for folder in self._plugin_dirs():
            try:
                manifest = load_manifest(folder)
                digest = hashlib.sha256(manifest.wasm_path.read_bytes()).hexdigest()
            except PluginLoadError as exc:
                report.errors[exc.plugin] = exc
                continue
            except OSError as exc:
                report.errors[folder.name] = PluginLoadError(str(exc), plugin=folder.name)
                continue
            if manifest.name in found:
                report.errors[manifest.name] = PluginLoadError(
                    f"{folder} declares a name another plugin folder already uses",
                    plugin=manifest.name,
                    key="name",
                )
                continue
            found[manifest.name] = (manifest, digest)

        new_table: dict[str, _Loaded] = {}
        for name, (manifest, digest) in sorted(found.items()):
            old = current.get(name)
            if old is not None and old.manifest == manifest and old.wasm_sha256 == digest:
                new_table[name] = old
                report.unchanged.append(name)
                continue
            try:
                pool = await asyncio.to_thread(self._build_pool, manifest)
            except PluginError as exc:
                error = (
                    exc
                    if isinstance(exc, PluginLoadError)
                    else PluginLoadError(str(exc.message), plugin=name)
                )
                report.errors[name] = error
                if old is not None:
                    new_table[name] = old
                    report.kept.append(name)
                continue
            new_table[name] = _Loaded(manifest, pool.runtime.wasm_sha256, pool)
            report.loaded.append(name)
        report.removed = sorted(name for name in current if name not in new_table)

        if self._closed:  # closed while compiling: do not install anything
            for name in report.loaded:
                new_table[name].pool.close()
            return report
        self._plugins = new_table
        self._errors = dict(report.errors)
        for name, old in current.items():
            if new_table.get(name) is not old:
                old.pool.close()
        report.seconds = time.perf_counter() - started
        log.info(
            "plugins reloaded in %.3f s: loaded=%s unchanged=%s removed=%s errors=%s",
            report.seconds,
            report.loaded,
            report.unchanged,
            report.removed,
            sorted(report.errors),
        )
        return report

    def _plugin_dirs(self) -> list[Path]:
        if not self.plugins_dir.is_dir():
            return []
        return sorted(p for p in self.plugins_dir.iterdir() if (p / MANIFEST_NAME).is_file())

    def _build_pool(self, manifest: PluginManifest) -> InstancePool:
        """Compile (or load from cache), validate, and warm one instance; runs on a thread."""
        runtime = PluginRuntime(manifest=manifest, cache=self.cache)
        pool = InstancePool(
            runtime=runtime,
            max_size=manifest.pool_size(self.default_pool_size),
            acquire_timeout=manifest.pool.acquire_timeout_ms / 1000,
        )
        pool.warm(1)
        return pool


__all__ = [
    "BatchOutcome",
    "CallOutcome",
    "PluginManager",
    "ReloadReport",
    "encode_batch",
    "encode_event",
]
