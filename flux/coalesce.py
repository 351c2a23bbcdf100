"""Run one async job at a time, calls made while it runs sharing one more run.

Two reload requests that arrive during a reload give one more reload, not two, and each
caller gets the result of a run that started after it called (as Home Assistant's reload
helper does). The queued run is a task of its own: a caller that gives up waiting does not
take it down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Coalesce concurrent runs of a job (``await coalescer.run(job)``)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._queued: asyncio.Task[T] | None = None

    async def run(self, job: Callable[[], Awaitable[T]]) -> T:
        """Run ``job`` after the run in progress, or join the run already queued behind it
        (whose job then runs instead of this one)."""
        if self._queued is None:
            task = asyncio.ensure_future(self._when_free(job))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._queued = task
        return await asyncio.shield(self._queued)

    async def _when_free(self, job: Callable[[], Awaitable[T]]) -> T:
        async with self._lock:
            self._queued = None
            return await job()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Let the queued run finish, then keep every other run out while the block runs
        (closing what the job works on)."""
        queued = self._queued
        if queued is not None:
            await asyncio.gather(queued, return_exceptions=True)
        async with self._lock:
            yield


__all__ = ["Coalescer"]
