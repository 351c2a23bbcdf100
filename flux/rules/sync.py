"""Every instance sharing the database runs the same rules: a change anywhere reaches all.

A change to the rules (an API write, a reload) bumps the one row of ``ruleset_version``;
every gateway watches it and reloads when it moved. On SQLite each instance reads it about
twice a second. On PostgreSQL the bump also sends ``NOTIFY flux_rules`` in its transaction
and each instance LISTENs (``flux.store._pg_listen``: a lost listening connection is
opened again), so the others reload at once; the read every few seconds stays as a safety
net.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Self

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from flux.retry import Backoff
from flux.store._pg_listen import PgListener
from flux.store.database import writer_connection
from flux.store.schema import ruleset_version
from flux.tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: How often the version is read: SQLite (no notifications), PostgreSQL (a safety net).
POLL_S = {"sqlite": 0.5, "postgresql": 5.0}
CHANNEL = "flux_rules"


class RulesetSync:
    """Announce rule changes to the other instances, and reload on theirs."""

    def __init__(self, *, engine: AsyncEngine, reload: Callable[[], Awaitable[Any]]) -> None:
        self._engine = engine
        self._reload = reload
        self._postgres = engine.dialect.name == "postgresql"
        self._poll_s = POLL_S["postgresql" if self._postgres else "sqlite"]
        self._seen = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener = PgListener(engine, CHANNEL, self._notified) if self._postgres else None

    async def __aenter__(self) -> Self:
        self._seen = await self._read()
        if self._listener is not None:
            await self._listener.__aenter__()
        self._task = asyncio.create_task(self._watch(), name="rules:sync")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._listener is not None:
            await self._listener.__aexit__(None, None, None)

    @property
    def listening(self) -> bool:
        """Whether notifications arrive now (PostgreSQL)."""
        return self._listener is not None and self._listener.listening.is_set()

    async def wait_listening(self) -> None:
        """Return once notifications arrive (PostgreSQL), at once otherwise."""
        if self._listener is not None:
            await self._listener.listening.wait()

    async def announce(self) -> None:
        """Tell the other instances the rules changed (this one has reloaded already)."""
        conn = await writer_connection(self._engine)
        try:
            async with conn.begin():
                result = await conn.execute(
                    update(ruleset_version)
                    .where(ruleset_version.c.id == 1)
                    .values(version=ruleset_version.c.version + 1, changed_at=datetime.now(UTC))
                    .returning(ruleset_version.c.version)
                )
                version = result.scalar_one()
                if self._postgres:
                    notify = text("SELECT pg_notify(:channel, :version)")
                    await conn.execute(notify, {"channel": CHANNEL, "version": str(version)})
        finally:
            await conn.close()
        self._seen = max(self._seen, int(version))

    async def _read(self) -> int:
        async with self._engine.connect() as conn:
            query = select(ruleset_version.c.version).where(ruleset_version.c.id == 1)
            return int((await conn.execute(query)).scalar_one_or_none() or 0)

    def _notified(self, *_args: object) -> None:
        self._changed.set()

    async def _watch(self) -> None:
        backoff = Backoff(first_s=self._poll_s, max_s=30.0)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):
                    await self._changed.wait()
            self._changed.clear()
            try:
                version = await self._read()
                if version != self._seen:
                    self._seen = version
                    log.info("rules changed by another instance (version %d): reloading", version)
                    await self._reload()
                backoff.reset()
            except Exception as exc:  # the database away: try again, never die
                delay = backoff.next()
                log.warning("cannot read the ruleset version: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)


__all__ = ["CHANNEL", "POLL_S", "RulesetSync"]
