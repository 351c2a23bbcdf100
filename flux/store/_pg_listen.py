"""PostgreSQL ``LISTEN`` through asyncpg (its ``add_listener``), and nowhere else.

One connection of the engine's pool is held for the listener's lifetime. When it is lost
the listener reconnects with the shared backoff and calls ``on_notify`` once (a
notification may have been missed meanwhile), so the caller re-checks what it watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Self

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from flux.retry import Backoff
from flux.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class PgListener:
    """Call ``on_notify(payload)`` on the loop for every notification on ``channel``."""

    def __init__(self, engine: AsyncEngine, channel: str, on_notify: Callable[[str], None]) -> None:
        self._engine = engine
        self._channel = channel
        self._on_notify = on_notify
        self._task: asyncio.Task[None] | None = None
        #: Set while the listener is connected and listening.
        self.listening = asyncio.Event()

    async def __aenter__(self) -> Self:
        if self._task is not None:
            raise RuntimeError("the listener is already running")
        self._task = asyncio.create_task(self._run(), name=f"pg-listen:{self._channel}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._on_notify(payload)

    async def _run(self) -> None:
        backoff = Backoff(first_s=0.1, max_s=5.0)
        first = True
        while True:
            conn: AsyncConnection | None = None
            try:
                conn = await self._engine.connect()
                raw = await conn.get_raw_connection()
                driver: Any = raw.driver_connection
                lost = asyncio.Event()
                driver.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await driver.add_listener(self._channel, self._notified)
                self.listening.set()
                backoff.reset()
                if not first:
                    self._on_notify("")  # reconnected: something may have been missed
                first = False
                await lost.wait()
                log.warning("lost the PostgreSQL connection listening on %s", self._channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an outage: retried, never fatal
                log.warning("cannot listen on %s: %s", self._channel, exc)
            finally:
                self.listening.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.invalidate()
                        await conn.close()
            await asyncio.sleep(backoff.next())


__all__ = ["PgListener"]
