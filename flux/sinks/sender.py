"""An ordered sink: sends its outbox rows in id order through a transport, at least once.

Rows come from two places. Rows this process commits are handed over in memory right after
the commit (no read back); rows already in the table at start (a backlog from before a
restart), rows beyond what memory holds, and rows other gateway processes committed are read
from the outbox in id order ("catching up"). A row leaves the outbox only after the receiver
confirmed it: its deletion rides on the store's next transaction. So a crash, a lost
connection or a refusal means the row is sent again, in order: at least once, never lost.

One process sends a sink's rows at a time: it holds the sink's lease in the database (renewed
while it runs), so a second process on the same database does not send them out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol, Self

from flux.config import BaseSinkConfig
from flux.errors import SinkSendError
from flux.retry import Backoff
from flux.sinks.metrics import SINK_CONNECTED, SINK_DROPPED, SINK_FAILURES, SINK_SENT
from flux.sinks.outbox import OutboxReader, row_created_at
from flux.sinks.rows import OutboxRow
from flux.tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: Called with rows the receiver confirmed, in order.
Confirm = Callable[[list[OutboxRow]], None]
#: Rows held in memory per sink before the rest is read back from the outbox when needed.
MEMORY_ROWS = 20_000
#: The lease's lifetime; it is renewed at a third of it.
LEASE_TTL_S = 15.0
#: How often a sink sharing the database with other processes looks for their rows.
RESCAN_S = 5.0
#: Rows deleted per drop when ``drop_oldest`` trims a full backlog.
DROP_CHUNK = 500


class Transport(Protocol):
    """How a sink reaches its receiver."""

    @property
    def window(self) -> int:
        """How many rows may be sent and not yet confirmed."""
        ...

    @property
    def connected(self) -> bool: ...

    def on_change(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called when the transport's window or connection changes."""
        ...

    @property
    def last_error(self) -> str: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def send(self, rows: list[OutboxRow], confirm: Confirm) -> None:
        """Send ``rows`` in order; ``confirm`` them as the receiver confirms (in order).
        ``SinkSendError`` when none was sent (the sink retries them after a backoff)."""
        ...


class OrderedSink:
    """One sink: its backlog, the rows it sends, in order, and what it reports."""

    def __init__(
        self,
        *,
        name: str,
        config: BaseSinkConfig,
        transport: Transport,
        reader: OutboxReader,
        delete: Callable[[Sequence[str]], None],
        owner: str,
        shared: bool = False,
    ) -> None:
        self.name = name
        self.config = config
        self.transport = transport
        self._reader = reader
        self._delete = delete
        self._owner = owner
        self._shared = shared
        self.max_bytes = int(config.max_backlog_mb * 1024 * 1024)
        # Committed rows not yet handed to the transport, oldest first.
        self._pending: deque[OutboxRow] = deque()
        # Handed to the transport and not yet confirmed, in the order sent.
        self._outstanding: dict[str, OutboxRow] = {}
        # Until a read of the outbox comes back short: rows past ``_cursor`` are read from
        # the table; rows handed over meanwhile wait in ``_buffered``.
        self._catching_up = True
        self._cursor = ""
        self._buffered: list[OutboxRow] = []
        self._overflowed = False
        self.backlog_rows = 0
        self.backlog_bytes = 0
        self._oldest_in_db: str | None = None
        self.paused = False
        self.leased = False
        self.last_error = ""
        self.sent = 0
        self._sent_at: deque[tuple[float, int]] = deque(maxlen=60)
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._backoff = Backoff(first_s=0.2, max_s=config.retry_max_delay_s)
        self._sent_counter = SINK_SENT.labels(sink=name)
        self._connected_gauge = SINK_CONNECTED.labels(sink=name)

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._tasks:
            raise RuntimeError(f"sink {self.name} is already running")
        self.transport.on_change(self._wake.set)
        await self.transport.__aenter__()
        self._connected_gauge.set(0)
        try:
            await self._resync()  # before any row of this run is committed
        except Exception as exc:
            log.warning("sink %s: cannot read its backlog yet: %s", self.name, exc)
        self._tasks = [
            asyncio.create_task(self._lease_loop(), name=f"sink:{self.name}:lease"),
            asyncio.create_task(self._send_loop(), name=f"sink:{self.name}:send"),
        ]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(*tasks)
        await self.transport.__aexit__(None, None, None)
        if self.leased:
            with contextlib.suppress(Exception):
                await self._reader.release_lease(self.name, owner=self._owner)
            self.leased = False

    # -- rows in ---------------------------------------------------------------------------

    def committed(self, rows: Sequence[OutboxRow]) -> None:
        """``rows`` (this sink's, in id order) are committed: count them and send them."""
        self.backlog_rows += len(rows)
        self.backlog_bytes += sum(row.size for row in rows)
        if self._catching_up:
            if not self._overflowed:
                self._buffered.extend(rows)
                self._overflowed = len(self._buffered) > MEMORY_ROWS
                if self._overflowed:
                    self._buffered.clear()  # the read-back finds them in the table
        elif len(self._pending) < MEMORY_ROWS:
            self._pending.extend(rows)
        else:
            self._catching_up, self._cursor = True, self._pending[-1].id
        if self.backlog_bytes >= self.max_bytes:
            self._full()
        self._wake.set()

    @property
    def full(self) -> bool:
        """Whether the backlog is at ``max_backlog_mb`` (``block``: the store waits)."""
        return self.backlog_bytes >= self.max_bytes

    async def wait_for_room(self) -> None:
        """Return once the backlog is below ``max_backlog_mb``."""
        await self._room.wait()

    def _full(self) -> None:
        if self.config.overflow == "drop_oldest":
            self._wake.set()  # the send loop trims it
        elif self._room.is_set():
            self._room.clear()
            log.warning(
                "sink %s: backlog full (%d rows, %.1f of %.1f MB); device messages wait "
                "unacknowledged until it drains",
                self.name,
                self.backlog_rows,
                self.backlog_bytes / 1e6,
                self.max_bytes / 1e6,
            )

    # -- what it reports ---------------------------------------------------------------------

    def oldest_age_s(self) -> float:
        """How long the oldest undelivered row has waited (0 when nothing waits)."""
        if not self.backlog_rows:
            return 0.0
        candidates = [next(iter(self._outstanding))] if self._outstanding else []
        if self._pending:
            candidates.append(self._pending[0].id)
        if self._oldest_in_db is not None and (self._catching_up or not self.leased):
            candidates.append(self._oldest_in_db)
        if not candidates:
            return 0.0
        return max(0.0, time.time() - row_created_at(min(candidates)))

    @property
    def connected(self) -> bool:
        """Whether the transport reaches the receiver."""
        return self.transport.connected

    @property
    def error(self) -> str:
        """The last failure to reach the receiver, while it lasts ("" once a send works)."""
        return self.last_error or self.transport.last_error

    def send_rate(self) -> float:
        """Rows confirmed per second over the last minute."""
        if len(self._sent_at) < 2:
            return 0.0
        (first_at, first), (last_at, last) = self._sent_at[0], self._sent_at[-1]
        return (last - first) / (last_at - first_at) if last_at > first_at else 0.0

    def pause(self) -> None:
        """Stop sending (rows keep coming in and wait); ``resume`` goes on in order."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    # -- the lease -------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        while True:
            try:
                leased = await self._reader.take_lease(
                    self.name, owner=self._owner, ttl_s=LEASE_TTL_S
                )
                if leased and self._shared:
                    await self._resync()  # other processes add rows too
                if leased != self.leased:
                    self.leased = leased
                    who = "this process sends" if leased else "another process sends"
                    log.info("sink %s: %s", self.name, who)
                    self._wake.set()
            except Exception as exc:
                log.warning("sink %s: cannot renew its lease: %s", self.name, exc)
            await asyncio.sleep(LEASE_TTL_S / 3 if self.leased else LEASE_TTL_S / 5)

    async def _resync(self) -> None:
        """Take the backlog figures from the table (at start, and when others write too)."""
        backlog = await self._reader.backlog(self.name)
        self.backlog_rows, self.backlog_bytes = backlog.rows, backlog.bytes
        self._oldest_in_db = backlog.oldest_id
        idle = not self._pending and not self._outstanding
        if self._shared and idle and not self._catching_up:
            # Another process's rows are in the table only: read it through once more.
            self._catching_up, self._cursor = True, ""
        if not self.full and not self._room.is_set():
            self._room.set()

    # -- sending ---------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            await self._wait()
            if self.paused or not self.leased:
                continue
            try:
                if self.config.overflow == "drop_oldest" and self.full:
                    await self._drop_oldest()
                await self._send_what_fits()
            except SinkSendError as exc:
                SINK_FAILURES.labels(sink=self.name, reason=exc.reason).inc()
                self._connected_gauge.set(0)
                self.last_error = exc.message
                delay = self._backoff.next()
                log.warning("sink %s: %s; retrying in %.1fs", self.name, exc.message, delay)
                await asyncio.sleep(delay)
                self._wake.set()
            except Exception as exc:  # the outbox cannot be read: retry, never die
                self.last_error = f"cannot read the outbox: {exc}"
                delay = self._backoff.next()
                log.warning("sink %s: %s; retrying in %.1fs", self.name, self.last_error, delay)
                await asyncio.sleep(delay)
                self._wake.set()

    async def _wait(self) -> None:
        timeout = RESCAN_S if self._shared else None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        self._wake.clear()

    async def _send_what_fits(self) -> None:
        room = self.transport.window - len(self._outstanding)
        while room > 0 and not self.paused:  # a pause stops at the next batch
            rows = await self._next_rows(min(room, self.config.batch_size))
            if not rows:
                return
            for row in rows:
                self._outstanding[row.id] = row
            try:
                await self.transport.send(rows, self._confirmed)
            except SinkSendError:
                for row in rows:
                    self._outstanding.pop(row.id, None)
                self._pending.extendleft(reversed(rows))
                raise
            room = self.transport.window - len(self._outstanding)

    async def _next_rows(self, count: int) -> list[OutboxRow]:
        if not self._pending and self._catching_up:
            await self._read_more()
        return [self._pending.popleft() for _ in range(min(count, len(self._pending)))]

    async def _read_more(self) -> None:
        """Read the next rows of the table; a short read ends the catching up."""
        limit = self.config.batch_size
        rows = await self._reader.read(self.name, after=self._cursor, limit=limit)
        fresh = [row for row in rows if row.id not in self._outstanding]
        if rows:
            self._cursor = rows[-1].id
        self._pending.extend(fresh)
        if len(rows) < limit:
            self._catching_up = False
            if not self._overflowed:
                self._pending.extend(row for row in self._buffered if row.id > self._cursor)
            self._buffered, self._overflowed = [], False
            if self._pending:
                self._cursor = max(self._cursor, self._pending[-1].id)

    def _confirmed(self, rows: list[OutboxRow]) -> None:
        """The receiver has ``rows``: delete them (on the store's next transaction)."""
        ids = [row.id for row in rows if self._outstanding.pop(row.id, None) is not None]
        if not ids:
            return
        self._delete(ids)
        self.backlog_rows = max(0, self.backlog_rows - len(ids))
        self.backlog_bytes = max(0, self.backlog_bytes - sum(row.size for row in rows))
        self.sent += len(ids)
        self._sent_counter.inc(len(ids))
        self._sent_at.append((time.monotonic(), self.sent))
        self._connected_gauge.set(1)
        self._backoff.reset()
        self.last_error = ""
        if not self.full and not self._room.is_set():
            self._room.set()
            log.info("sink %s: backlog below its limit again", self.name)
        self._wake.set()

    async def _drop_oldest(self) -> None:
        """Delete the oldest unsent rows until the backlog fits again; count every one.

        The oldest rows are those waiting in memory, then those past the read cursor in the
        table (the cursor moves past them, so a dropped row is never read again).
        """
        dropped = SINK_DROPPED.labels(sink=self.name, reason="drop_oldest")
        while self.full:
            if self._pending:
                count = min(DROP_CHUNK, len(self._pending))
                victims = [self._pending.popleft() for _ in range(count)]
            elif self._catching_up:
                victims = await self._reader.read(self.name, after=self._cursor, limit=DROP_CHUNK)
                if not victims:
                    return
                self._cursor = victims[-1].id
                gone = {row.id for row in victims}
                self._buffered = [row for row in self._buffered if row.id not in gone]
            else:
                return
            self._delete([row.id for row in victims])
            self.backlog_rows = max(0, self.backlog_rows - len(victims))
            self.backlog_bytes = max(0, self.backlog_bytes - sum(row.size for row in victims))
            dropped.inc(len(victims))
            log.warning("sink %s: backlog full, dropped %d oldest rows", self.name, len(victims))


__all__ = [
    "LEASE_TTL_S",
    "MEMORY_ROWS",
    "Confirm",
    "OrderedSink",
    "Transport",
]
