"""A bounded pool of warm instances of one plugin, with automatic recycling.

``acquire`` pops an idle instance (a hit), creates one while the pool is under its bound (a
miss), or waits for a release (a wait) until the timeout (exhausted: ``PoolExhausted``).

An instance is recycled after ``recycle.after_executions`` calls, when its linear memory
passes ``recycle.memory_high_water_bytes``, after any trap, timeout, limit or output error,
and after a manual ``restart``. ``run`` (which may execute on a worker thread) creates the
replacement right after the call, before the old instance is dropped, so the slot is never
empty and no caller waits for a recycle.

Threading: ``acquire``, ``release``, ``restart``, ``close`` and ``stats`` run on the event
loop; ``run`` touches only the instance it was given and the runtime, so it may run on any
thread. The pool never hands one instance to two callers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flux.plugins import metrics
from flux.plugins.errors import PluginError, PoolClosed, PoolExhausted
from flux.plugins.instance import PluginInstance, PluginOutput, PluginRejection
from flux.plugins.runtime import PluginRuntime

log = logging.getLogger(__name__)

#: At most one "pool exhausted" warning per pool in this many seconds.
EXHAUSTED_LOG_INTERVAL_S = 10.0


@dataclass(slots=True)
class CallResult:
    """One call as ``run`` saw it: outputs (and a batch's refused messages) or error, why
    the instance was recycled, time."""

    outputs: list[PluginOutput] = field(default_factory=list)
    rejected: list[PluginRejection] = field(default_factory=list)
    error: PluginError | None = None
    recycle_reason: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class InstanceStats:
    """One live instance as ``stats()`` reports it."""

    id: int
    executions: int
    memory_bytes: int
    created_at: float
    busy: bool


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of one plugin's pool (the shape the API and CLI show)."""

    plugin: str
    version: str
    wasm_sha256: str
    max_size: int
    size: int
    available: int
    in_use: int
    hits: int
    misses: int
    waits: int
    exhausted: int
    total_executions: int
    traps: int
    timeouts: int
    limits: int
    output_errors: int
    rejected: int
    restart_count: int
    recycles: dict[str, int]
    last_restart_time: float | None
    instances: tuple[InstanceStats, ...]

    @property
    def hit_ratio(self) -> float | None:
        """Return hits / (hits + misses), the seed's pool health figure, or ``None`` if idle."""
        total = self.hits + self.misses
        return self.hits / total if total else None

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (``hit_ratio`` included, instances as dicts)."""
        return {
            "plugin": self.plugin,
            "version": self.version,
            "wasm_sha256": self.wasm_sha256,
            "max_size": self.max_size,
            "size": self.size,
            "available": self.available,
            "in_use": self.in_use,
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": self.hit_ratio,
            "waits": self.waits,
            "exhausted": self.exhausted,
            "total_executions": self.total_executions,
            "traps": self.traps,
            "timeouts": self.timeouts,
            "limits": self.limits,
            "output_errors": self.output_errors,
            "rejected": self.rejected,
            "restart_count": self.restart_count,
            "recycles": dict(self.recycles),
            "last_restart_time": self.last_restart_time,
            "instances": [
                {
                    "id": i.id,
                    "current_instance_executions": i.executions,
                    "memory_bytes": i.memory_bytes,
                    "created_at": i.created_at,
                    "busy": i.busy,
                }
                for i in self.instances
            ],
        }


#: ``PluginError.result`` -> the stats counter it increments.
_FAILURE_COUNTERS = {
    "trap": "traps",
    "timeout": "timeouts",
    "limit": "limits",
    "output_error": "output_errors",
    "rejected": "rejected",
}


class InstancePool:
    """Warm instances of one plugin version, bounded by ``max_size``."""

    def __init__(self, *, runtime: PluginRuntime, max_size: int, acquire_timeout: float) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.runtime = runtime
        self.plugin = runtime.name
        self.max_size = max_size
        self.acquire_timeout = acquire_timeout
        self._idle: deque[PluginInstance] = deque()
        self._busy: dict[int, PluginInstance] = {}
        self._waiters: deque[asyncio.Future[PluginInstance]] = deque()
        self._size = 0
        self._next_id = 0
        self._generation = 0
        self._closed = False
        self._after = runtime.manifest.recycle.after_executions
        self._high_water = runtime.manifest.memory_high_water_bytes
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "hits",
                "misses",
                "waits",
                "exhausted",
                "total_executions",
                "traps",
                "timeouts",
                "limits",
                "output_errors",
                "rejected",
                "restart_count",
            ),
            0,
        )
        self._recycles: dict[str, int] = {}
        self._last_restart: float | None = None
        self._exhausted_logged_at: float | None = None
        self._exhausted_unlogged = 0
        label = self.plugin
        self._m_hits = metrics.POOL_HITS.labels(label)
        self._m_misses = metrics.POOL_MISSES.labels(label)
        self._m_waits = metrics.POOL_WAITS.labels(label)
        self._m_exhausted = metrics.POOL_EXHAUSTED.labels(label)
        # Read at scrape time: no per-call cost. The newest pool of a plugin owns the label.
        metrics.POOL_AVAILABLE.labels(label).set_function(self._available_for_scrape)
        self._m_seconds = metrics.CALL_SECONDS.labels(label)
        self._m_ok = metrics.EXECUTIONS.labels(label, "ok")

    def _available_for_scrape(self) -> float:
        return 0.0 if self._closed else float(len(self._idle))

    # -- instances ---------------------------------------------------------------------------

    def _new_instance(self) -> PluginInstance:
        self._next_id += 1
        return PluginInstance(self.runtime, instance_id=self._next_id, generation=self._generation)

    def warm(self, count: int = 1) -> None:
        """Create up to ``count`` idle instances now (a reload does this before swapping)."""
        for _ in range(min(count, self.max_size - self._size)):
            instance = self._new_instance()
            self._size += 1
            self._idle.append(instance)

    @property
    def closed(self) -> bool:
        """Return whether the pool stopped handing out instances."""
        return self._closed

    async def acquire(self, timeout: float | None = None) -> PluginInstance:
        """Return an instance for exclusive use; give it back with ``release``.

        Raises ``PoolExhausted`` when none frees up within ``timeout`` (default: the
        manifest's ``pool.acquire_timeout_ms``) and ``PoolClosed`` after a reload.
        """
        if self._closed:
            raise PoolClosed("pool was replaced", plugin=self.plugin)
        if self._idle:
            instance = self._idle.pop()
            self._counts["hits"] += 1
            self._m_hits.inc()
        elif self._size < self.max_size:
            self._size += 1
            try:
                instance = self._new_instance()
            except BaseException:
                self._size -= 1
                raise
            self._counts["misses"] += 1
            self._m_misses.inc()
        else:
            instance = await self._wait(self.acquire_timeout if timeout is None else timeout)
            self._counts["hits"] += 1
            self._m_hits.inc()
        self._busy[instance.id] = instance
        return instance

    async def _wait(self, timeout: float) -> PluginInstance:
        self._counts["waits"] += 1
        self._m_waits.inc()
        waiter: asyncio.Future[PluginInstance] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            self._counts["exhausted"] += 1
            self._m_exhausted.inc()
            self._warn_exhausted(timeout)
            raise PoolExhausted(
                f"no instance free within {timeout:g} s (pool of {self.max_size})",
                plugin=self.plugin,
            ) from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _warn_exhausted(self, timeout: float) -> None:
        """Log that callers gave up waiting, at most once per ``EXHAUSTED_LOG_INTERVAL_S``."""
        self._exhausted_unlogged += 1
        now = time.monotonic()
        last = self._exhausted_logged_at
        if last is not None and now - last < EXHAUSTED_LOG_INTERVAL_S:
            return
        log.warning(
            "plugin %s: pool exhausted: %d call(s) since the last warning waited %g s for one "
            "of its %d instances and gave up; raise [pool] size in its plugin.toml (or "
            "[plugins] pool_size); see GET /api/v1/report",
            self.plugin,
            self._exhausted_unlogged,
            timeout,
            self.max_size,
        )
        self._exhausted_logged_at = now
        self._exhausted_unlogged = 0

    def run(
        self,
        instance: PluginInstance,
        payloads: Sequence[bytes],
        *,
        batch: bool = False,
        counts: Sequence[int] | None = None,
    ) -> tuple[list[CallResult], PluginInstance | None]:
        """Call the instance once per payload; recycle it in place whenever it must be.

        Returns one ``CallResult`` per payload and the instance to give back (a replacement
        if the original was recycled, ``None`` if no replacement could be made). Touches no
        pool state, so it may run on a worker thread; ``release`` does the accounting.
        """
        results: list[CallResult] = []
        current: PluginInstance | None = instance
        for position, data in enumerate(payloads):
            if current is None:
                results.append(
                    CallResult(
                        error=PluginError(
                            "no instance: the replacement could not be created", plugin=self.plugin
                        )
                    )
                )
                continue
            result = CallResult()
            started = time.perf_counter()
            try:
                result.outputs = current.call(
                    data, batch=batch, count=counts[position] if counts else 1
                )
                result.rejected = current.rejected
            except PluginError as exc:
                result.error = exc
            except Exception as exc:  # a host-side bug must not leak the instance
                log.exception("plugin %s: unexpected error in a call", self.plugin)
                current.failure = "error"
                result.error = PluginError(f"internal error: {exc!r}", plugin=self.plugin)
            result.seconds = time.perf_counter() - started
            reason = self._recycle_reason(current)
            if reason is not None:
                result.recycle_reason = reason
                replacement = self._replace(current)
                current.close()
                current = replacement
            results.append(result)
        return results, current

    def _recycle_reason(self, instance: PluginInstance) -> str | None:
        if instance.failure is not None:
            return instance.failure
        if self._closed:
            return None
        if instance.generation != self._generation:
            return "restart"
        if self._after and instance.executions >= self._after:
            return "executions"
        if instance.memory_bytes() > self._high_water:
            return "memory"
        return None

    def _replace(self, old: PluginInstance) -> PluginInstance | None:
        if self._closed:
            return None
        try:
            return PluginInstance(self.runtime, instance_id=old.id, generation=self._generation)
        except PluginError as exc:
            log.error("plugin %s: cannot create a replacement instance: %s", self.plugin, exc)
            return None

    def release(
        self,
        original: PluginInstance,
        final: PluginInstance | None,
        results: Sequence[CallResult] = (),
    ) -> None:
        """Take back what ``acquire`` gave out (``final`` is what ``run`` returned) and
        account the calls; a closed pool drops the instance instead of keeping it."""
        self._busy.pop(original.id, None)
        ok = 0
        for result in results:
            self._counts["total_executions"] += 1
            self._m_seconds.observe(result.seconds)
            error = result.error
            if error is None:
                ok += 1
            else:
                metrics.EXECUTIONS.labels(self.plugin, error.result).inc()
                counter = _FAILURE_COUNTERS.get(error.result)
                if counter is not None:
                    self._counts[counter] += 1
            if result.recycle_reason is not None:
                self._recycled(result.recycle_reason)
        if ok:
            self._m_ok.inc(ok)
        if final is None:
            self._size -= 1
            self._grant_waiter()
            return
        if self._closed or final.closed:
            final.close()
            self._size -= 1
            return
        self._hand_over(final)

    def _hand_over(self, instance: PluginInstance) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(instance)
                self._busy[instance.id] = instance
                return
        self._idle.append(instance)

    def _grant_waiter(self) -> None:
        """A slot was freed without an instance: create one for the first waiter, if any."""
        if not self._waiters or self._closed or self._size >= self.max_size:
            return
        try:
            instance = self._new_instance()
        except PluginError as exc:
            log.error("plugin %s: cannot create an instance: %s", self.plugin, exc)
            return
        self._size += 1
        self._counts["misses"] += 1
        self._m_misses.inc()
        self._hand_over(instance)

    def _recycled(self, reason: str) -> None:
        self._counts["restart_count"] += 1
        self._recycles[reason] = self._recycles.get(reason, 0) + 1
        self._last_restart = time.time()
        metrics.RECYCLES.labels(self.plugin, reason).inc()

    # -- control -------------------------------------------------------------------------------

    def restart(self) -> int:
        """Replace every instance: idle ones now (new first), busy ones when they come back.

        Returns how many idle instances were replaced.
        """
        self._generation += 1
        replaced = 0
        idle, self._idle = self._idle, deque()
        for old in idle:
            new = self._replace(old)
            self._recycled("restart")
            old.close()
            replaced += 1
            if new is None:
                self._size -= 1
            else:
                self._idle.append(new)
        return replaced

    def close(self) -> None:
        """Stop handing out instances; idle ones are released now, busy ones on return.

        Waiters get ``PoolClosed`` so the manager can retry them on the replacement pool.
        """
        if self._closed:
            return
        self._closed = True
        while self._idle:
            self._idle.pop().close()
            self._size -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolClosed("pool was replaced", plugin=self.plugin))

    def largest_idle_memory(self) -> int | None:
        """The largest linear memory among idle instances, None when none is idle (a busy
        instance may be running on a plugin thread, so it is not touched)."""
        if not self._idle:
            return None
        return max(instance.memory_bytes() for instance in self._idle)

    @property
    def in_use(self) -> int:
        """Return how many instances are checked out."""
        return len(self._busy)

    def stats(self) -> PoolStats:
        """Return a snapshot of counters and of every live instance."""
        instances = [
            InstanceStats(i.id, i.executions, i.memory_bytes(), i.created_at, False)
            for i in self._idle
        ] + [
            InstanceStats(i.id, i.executions, i.memory_bytes(), i.created_at, True)
            for i in self._busy.values()
        ]
        counts = self._counts
        manifest = self.runtime.manifest
        return PoolStats(
            plugin=self.plugin,
            version=manifest.version,
            wasm_sha256=self.runtime.wasm_sha256,
            max_size=self.max_size,
            size=self._size,
            available=len(self._idle),
            in_use=len(self._busy),
            hits=counts["hits"],
            misses=counts["misses"],
            waits=counts["waits"],
            exhausted=counts["exhausted"],
            total_executions=counts["total_executions"],
            traps=counts["traps"],
            timeouts=counts["timeouts"],
            limits=counts["limits"],
            output_errors=counts["output_errors"],
            rejected=counts["rejected"],
            restart_count=counts["restart_count"],
            recycles=dict(self._recycles),
            last_restart_time=self._last_restart,
            instances=tuple(sorted(instances, key=lambda i: i.id)),
        )


__all__ = ["CallResult", "InstancePool", "InstanceStats", "PoolStats"]
