"""The batched writer: one transaction per batch, commit, then acknowledge in order.

Event batches go to the database driver directly (``sqlite_batch``, ``postgres_batch``),
with what rides on them in the same transaction (``flux.store.riders``): the alert and
outbox rows the pipeline queued meanwhile, the outbox rows of the sinks the batch's events
are routed to, and the deletions of outbox rows the sinks' receivers confirmed. Riders no
batch takes, when no event follows them, commit on their own a little later; dead letters
go through SQLAlchemy Core.

Acknowledgement comes strictly after commit: an MQTT QoS 1 message is PUBACKed, an HTTP
request answered, only once its row is durable. A database that is away makes the writer
retry with capped, jittered backoff and acknowledge nothing meanwhile; the bus fills and
back-pressure reaches the senders. A row the database rejects outright (not an outage:
for example a string PostgreSQL's JSONB cannot hold) becomes a dead letter so one bad event
cannot wedge the batch.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Self, TypeVar

from orjson import JSONEncodeError
from sqlalchemy import delete, insert
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from flux import faults
from flux.config import DatabaseConfig
from flux.errors import StoreUnavailable
from flux.events import DeadLetter, Event
from flux.metrics import (
    DB_BATCH_SIZE,
    DB_QUERY_DURATION,
    DB_WRITE_ERRORS,
    DEAD_LETTERS,
    DEAD_LETTERS_REFUSED,
    DEGRADED,
    EVENT_COMMIT_LATENCY,
    SUBSCRIBER_ERRORS,
)
from flux.retry import DB_RETRY_FIRST_S, Backoff
from flux.rules.state import StateRow
from flux.sinks.rows import OutboxRow
from flux.store.database import sqlite_path, utc_datetime, writer_connection
from flux.store.outbox import NO_SINKS, OutboxHooks, outbox_values
from flux.store.riders import Riders
from flux.store.rule_state import write_rule_state
from flux.store.schema import alerts, dead_letters
from flux.store.schema import outbox as outbox_table
from flux.store.sqlite_batch import DeviceSummary, PreparedBatch, SqliteBatchWriter
from flux.tasks import cancel_and_wait

if TYPE_CHECKING:
    from flux.store.postgres_batch import PostgresBatchWriter

log = logging.getLogger(__name__)
T = TypeVar("T")

REASON_STORE_REJECTED = "store_rejected"
#: How long queued alert and outbox rows wait for an event batch to take them along before
#: they are committed on their own.
RIDERS_ALONE_AFTER_S = 0.005
#: The same for deletions of delivered outbox rows alone (nobody waits for those, but a crash
#: before they commit sends those rows again).
DELETES_ALONE_AFTER_S = 0.01
_DEAD_LETTER_BATCH = 256
_DEAD_LETTER_QUEUE = 1024
#: ``dead_letter_backlog`` above this many queued dead letters, cleared below the low mark.
_DEAD_LETTER_HIGH, _DEAD_LETTER_LOW = _DEAD_LETTER_QUEUE * 8 // 10, _DEAD_LETTER_QUEUE // 2


def _device_summaries(batch: Sequence[Event]) -> list[DeviceSummary]:
    """Fold a batch into one entry per device (first/last seen, count, last payload), in
    device order (one lock order across workers).

    Only messages the device sent count (hop 0): derived events (decoded, enriched,
    statistics) are stored as events but are not the device's messages.
    """
    summary: dict[str, list[Any]] = {}
    for event in batch:
        if event.device_id is None or event.hops:
            continue
        entry = summary.get(event.device_id)
        if entry is None:
            summary[event.device_id] = [event.received_at, event.received_at, 1, event.payload]
        else:
            entry[1] = max(entry[1], event.received_at)
            entry[2] += 1
            entry[3] = event.payload
    return [(device, *summary[device]) for device in sorted(summary)]


def _storable_text(text: str) -> str:
    """Escape what a text column refuses (PostgreSQL: NUL) so a dead letter always fits."""
    return text.replace("\x00", "\\u0000")


def _dead_letter_row(letter: DeadLetter) -> dict[str, Any]:
    """The row of a dead letter; the raw bytes are kept exactly, the texts made storable."""
    return {
        "topic": _storable_text(letter.topic),
        "payload": letter.raw,
        "reason": letter.reason,
        "detail": _storable_text(letter.detail),
        "source": letter.source,
        "received_at": utc_datetime(letter.received_at),
    }


#: The reasons the writer reports while it cannot write (``flux_degraded``; /ready 503).
UNAVAILABLE = "database_unavailable"
DISK_FULL = "disk_full"
#: What SQLite (SQLITE_FULL), the OS (ENOSPC) and PostgreSQL (53100) say when the disk is full.
_DISK_FULL_TEXTS = ("database or disk is full", "no space left on device", "disk full")


def _is_disk_full(exc: BaseException) -> bool:
    """Whether a failed write failed because the disk (or the database's quota) is full."""
    for error in (exc, getattr(exc, "orig", None), exc.__cause__):
        if error is None:
            continue
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        if getattr(error, "sqlstate", None) == "53100":
            return True
    text = str(exc).lower()
    return any(marker in text for marker in _DISK_FULL_TEXTS)


def _is_outage(exc: BaseException) -> bool:
    """Tell a database that is away (retry later) from one that rejects the data (never)."""
    if isinstance(
        exc, OperationalError | sqlite3.OperationalError | OSError | ConnectionError | TimeoutError
    ):
        return True
    if isinstance(exc, DBAPIError):
        return bool(exc.connection_invalidated)
    return False


class StoreWriter:
    """Write event batches and dead letters, retrying through outages, acking after commit."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        retry_max_delay_s: float = 10.0,
        sqlite_synchronous: str = "FULL",
        outbox: OutboxHooks | None = None,
    ) -> None:
        self._engine = engine
        self._retry_max_delay_s = retry_max_delay_s
        # Event batches go to the driver in one transaction (``flux.store.sqlite_batch``,
        # ``flux.store.postgres_batch``); everything else goes through SQLAlchemy.
        self._batches: SqliteBatchWriter | PostgresBatchWriter
        if engine.dialect.name == "postgresql":
            from flux.store.postgres_batch import PostgresBatchWriter

            self._batches = PostgresBatchWriter(engine)
        else:
            path = sqlite_path(str(engine.url))
            if path is None:
                raise ValueError("the store needs a SQLite file, not an in-memory database")
            self._batches = SqliteBatchWriter(path, synchronous=sqlite_synchronous)
        self._dead_letters: asyncio.Queue[DeadLetter] = asyncio.Queue(maxsize=_DEAD_LETTER_QUEUE)
        self._dead_letter_task: asyncio.Task[None] | None = None
        self._outbox = outbox or NO_SINKS
        # What rides on the next batch (alert and outbox rows, outbox deletions).
        self._riders = Riders()
        self._riders_due = asyncio.Event()
        self._batches_taken = 0  # event batches started (each takes the riders along)
        self._rider_task: asyncio.Task[None] | None = None
        # The commit in progress (batches are prepared while the previous one commits).
        self._committing: asyncio.Task[None] | None = None
        # Writable as far as we know: from start-up (the database was just migrated) until
        # a write fails, and again once one commits.
        self.available = False
        self.unavailable_reason = UNAVAILABLE
        self.dead_letter_backlog = False
        self.last_error = "not started"

    @classmethod
    def from_config(
        cls, config: DatabaseConfig, *, engine: AsyncEngine, outbox: OutboxHooks | None = None
    ) -> StoreWriter:
        """A writer for ``engine`` with the configured retry cap and SQLite durability,
        writing the outbox rows of the sinks ``outbox`` routes events to."""
        return cls(
            engine=engine,
            retry_max_delay_s=config.retry_max_delay_s,
            sqlite_synchronous=config.sqlite_synchronous,
            outbox=outbox,
        )

    async def __aenter__(self) -> Self:
        if self._dead_letter_task is not None:
            raise RuntimeError("the store writer is already running")
        self.available, self.unavailable_reason, self.last_error = True, "", ""
        for reason in (UNAVAILABLE, DISK_FULL, "dead_letter_backlog"):
            DEGRADED.labels(reason=reason).set(0)
        self._dead_letter_task = asyncio.create_task(
            self._dead_letter_loop(), name="store:dead-letters"
        )
        self._rider_task = asyncio.create_task(self._rider_loop(), name="store:riders")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._dead_letter_task = self._dead_letter_task, None
        if task is not None:
            await self._drain_dead_letters(timeout=5.0)
            await cancel_and_wait(task)
        await self.flush()
        rider_task, self._rider_task = self._rider_task, None
        await cancel_and_wait(rider_task)
        if self._riders:
            await self._commit_riders_alone()
        if self._riders.rows_waiting:
            log.warning(
                "%d alert and %d outbox rows uncommitted at shutdown; their events are redelivered",
                len(self._riders.alerts),
                len(self._riders.outbox),
            )
        await self._batches.close()

    async def run_between_commits(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` on the SQLite writer's own thread and connection, between two batch
        commits (``SqliteBatchWriter.run``); SQLite only."""
        if not isinstance(self._batches, SqliteBatchWriter):
            raise TypeError("run_between_commits needs a SQLite database")
        return await self._batches.run(work)

    # -- events ---------------------------------------------------------------------------

    async def write_batch(self, batch: list[Event]) -> None:
        """Commit ``batch`` and acknowledge it; return once that is done."""
        await self.store_batch(batch)
        await self.flush()

    async def flush(self) -> None:
        """Wait for the commit in progress (and the acknowledgements after it)."""
        if self._committing is not None:
            await asyncio.gather(self._committing, return_exceptions=True)

    async def store_batch(self, batch: list[Event]) -> None:
        """Prepare ``batch`` (with its riders and the outbox rows of the sinks its events are
        routed to) and start its commit once the previous batch's commit is over; it is
        acknowledged, in arrival order, after. The bus's store subscriber.

        Preparing a batch's rows overlaps the previous batch's commit (on the SQLite thread,
        or in PostgreSQL); commits stay one at a time and in order, so a crash redelivers at
        most the batch committing and the one prepared behind it. While a sink with the
        ``block`` policy has a full backlog, the batch waits here (back-pressure).
        """
        if not batch:
            return
        await self._outbox.wait_for_room()
        riders, self._riders = self._riders, Riders()
        self._batches_taken += 1
        routed = self._outbox.route(batch)
        outbox = [*routed, *riders.outbox] if riders.outbox else routed
        prepared: PreparedBatch | None
        try:
            prepared = self._batches.prepare(
                batch,
                _device_summaries(batch),
                riders.alerts,
                outbox,
                riders.deletes,
                riders.state,
            )
        except JSONEncodeError:
            prepared = None  # a payload orjson cannot write: the commit isolates it
        previous, self._committing = self._committing, None
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        self._committing = asyncio.create_task(
            self._commit(batch, prepared, riders, outbox), name="store:commit"
        )

    async def _commit(
        self,
        batch: Sequence[Event],
        prepared: PreparedBatch | None,
        riders: Riders,
        outbox: Sequence[OutboxRow],
    ) -> None:
        """Commit one prepared batch (retrying through outages), then acknowledge it."""
        try:
            rejected = (
                "a payload cannot be written as JSON"
                if prepared is None
                else await self._with_retry(partial(self._batches.commit, prepared))
            )
            if rejected:
                outbox = await self._isolate_rejected(batch)
                outbox.extend(riders.outbox)
                await self._commit_riders(riders)
        except Exception:
            SUBSCRIBER_ERRORS.labels(subscriber="store").inc()
            log.exception("store failed on a batch of %d events; left for redelivery", len(batch))
            return
        faults.hit("after_commit")
        DB_BATCH_SIZE.observe(len(batch))
        committed_at = time.time()
        EVENT_COMMIT_LATENCY.observe_many(
            [committed_at - event.received_at for event in batch if event.source != "derived"]
        )
        self._outbox.committed(outbox)
        riders.confirm()
        for event in batch:
            event.ack()
            faults.hit("mid_ack")

    def _event_attempt(
        self, event: Event, routed: Sequence[OutboxRow]
    ) -> Callable[[], Awaitable[None]]:
        """One try at committing ``event``, its device row and the outbox rows routed from
        it (orjson may refuse its payload)."""

        async def attempt() -> None:
            await self._batches.commit(
                self._batches.prepare([event], _device_summaries([event]), (), routed)
            )

        return attempt

    async def _isolate_rejected(self, batch: Sequence[Event]) -> list[OutboxRow]:
        """Write a rejected batch one event at a time; dead-letter the ones refused (they
        are forwarded nowhere). Return the outbox rows committed with the others.

        The dead letter holds the raw bytes in a binary column and escaped texts, so the
        database cannot refuse it for the content that got the event refused.
        """
        committed: list[OutboxRow] = []
        for event in batch:
            routed = self._outbox.route([event])
            rejected = await self._with_retry(self._event_attempt(event, routed))
            if not rejected:
                committed.extend(routed)
            else:
                letter = DeadLetter(
                    topic=event.topic,
                    raw=event.raw,
                    reason=REASON_STORE_REJECTED,
                    detail=f"the database refused the event: {rejected}",
                    received_at=event.received_at,
                    source=event.source,
                )
                refused = await self._insert_dead_letters_retrying([letter])
                if refused:
                    # Should be impossible; never acknowledge what is stored nowhere.
                    raise StoreUnavailable(f"the database refused a dead letter: {refused}")
                DEAD_LETTERS.labels(reason=REASON_STORE_REJECTED).inc()
        return committed

    # -- riders ---------------------------------------------------------------------------

    def add_alerts(self, rows: Sequence[dict[str, Any]], confirm: Callable[[], None]) -> None:
        """Queue alert rows for the next event batch's transaction; ``confirm`` runs once
        they are committed (with that batch, or on their own when no batch follows)."""
        self.add_rows(alerts=rows, confirm=confirm)

    def add_rows(
        self,
        *,
        alerts: Sequence[dict[str, Any]] = (),
        outbox: Sequence[OutboxRow] = (),
        state: Sequence[StateRow] = (),
        confirm: Callable[[], None],
    ) -> None:
        """Queue alert, outbox and rule state rows for the next event batch's transaction;
        ``confirm`` runs once they are committed."""
        self._riders.add(alerts=alerts, outbox=outbox, state=state, confirm=confirm)
        self._riders_due.set()

    def delete_outbox(self, ids: Sequence[str]) -> None:
        """Delete outbox rows whose receiver confirmed them, in a coming transaction (a
        crash before it means they are sent again: at least once)."""
        self._riders.deletes.extend(ids)
        self._riders_due.set()

    async def _rider_loop(self) -> None:
        """Commit the riders no event batch takes along: rows still queued after
        ``RIDERS_ALONE_AFTER_S`` in which no batch started or committed (while batches
        flow, the next one takes them), and deletions alone after ``DELETES_ALONE_AFTER_S``."""
        while True:
            await self._riders_due.wait()
            self._riders_due.clear()
            while self._riders:
                taken = self._batches_taken
                waiting = self._riders.rows_waiting
                await asyncio.sleep(RIDERS_ALONE_AFTER_S if waiting else DELETES_ALONE_AFTER_S)
                committing = self._committing is not None and not self._committing.done()
                if self._batches_taken != taken or committing or not self._riders:
                    continue
                await self._commit_riders_alone()

    async def _commit_riders_alone(self) -> None:
        """Commit the queued riders in a transaction of their own, then confirm them."""
        riders, self._riders = self._riders, Riders()
        try:
            rejected = await self._with_retry(
                partial(
                    self._batches.commit,
                    self._batches.prepare(
                        (), (), riders.alerts, riders.outbox, riders.deletes, riders.state
                    ),
                )
            )
            if rejected:
                await self._commit_riders(riders)
        except Exception:
            log.exception("alert and outbox rows not committed; their events are redelivered")
            return
        self._outbox.committed(riders.outbox)
        riders.confirm()

    async def _commit_riders(self, riders: Riders) -> None:
        """The slow path after the database refused a batch: alert rows as ``_commit_alerts``
        does, outbox rows and deletions through SQLAlchemy."""
        await self._commit_alerts(riders.alerts)
        if riders.outbox or riders.deletes or riders.state:
            refused = await self._with_retry(
                self._transaction(partial(self._write_outbox, riders=riders))
            )
            if refused:
                raise StoreUnavailable(f"the database refused outbox rows: {refused}")

    async def _write_outbox(self, conn: AsyncConnection, riders: Riders) -> None:
        if riders.outbox:
            await conn.execute(insert(outbox_table), [outbox_values(row) for row in riders.outbox])
        if riders.deletes:
            await conn.execute(delete(outbox_table).where(outbox_table.c.id.in_(riders.deletes)))
        if riders.state:
            await write_rule_state(conn, riders.state)

    async def _commit_alerts(self, rows: Sequence[dict[str, Any]]) -> None:
        """Commit alert rows in one transaction; when the database refuses them, one by one,
        and an alert still refused with its output made storable text."""
        if not rows or not await self._insert_alerts_retrying(rows):
            return
        for row in rows:
            refused = await self._insert_alerts_retrying([row])
            if refused:
                log.error("the database refused an alert of rule %s: %s", row["rule_id"], refused)
                output = {"unstorable_output": _storable_text(repr(row["output"]))}
                if await self._insert_alerts_retrying([{**row, "output": output}]):
                    raise StoreUnavailable(f"the database refused an alert: {refused}")

    async def _insert_alerts_retrying(self, rows: Sequence[dict[str, Any]]) -> str | None:
        return await self._with_retry(self._transaction(partial(self._insert_alerts, rows=rows)))

    async def _insert_alerts(self, conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
        await conn.execute(insert(alerts), list(rows))

    # -- dead letters ---------------------------------------------------------------------

    async def add_dead_letter(self, letter: DeadLetter) -> None:
        """Queue a dead letter; it is committed in a batch and then acknowledged."""
        DEAD_LETTERS.labels(reason=letter.reason).inc()
        await self._dead_letters.put(letter)
        if not self.dead_letter_backlog and self._dead_letters.qsize() > _DEAD_LETTER_HIGH:
            self._set_dead_letter_backlog(True)

    async def _insert_dead_letters(
        self, conn: AsyncConnection, batch: Sequence[DeadLetter]
    ) -> None:
        await conn.execute(insert(dead_letters), [_dead_letter_row(letter) for letter in batch])

    async def _dead_letter_loop(self) -> None:
        while True:
            batch = [await self._dead_letters.get()]
            while len(batch) < _DEAD_LETTER_BATCH and not self._dead_letters.empty():
                batch.append(self._dead_letters.get_nowait())
            stored = {id(letter) for letter in await self._store_dead_letters(batch)}
            for letter in batch:
                if id(letter) in stored:
                    letter.ack()
                self._dead_letters.task_done()
            if self.dead_letter_backlog and self._dead_letters.qsize() < _DEAD_LETTER_LOW:
                self._set_dead_letter_backlog(False)

    async def _store_dead_letters(self, batch: Sequence[DeadLetter]) -> list[DeadLetter]:
        """Commit dead letters (retrying through outages); return those stored.

        When the database refuses the batch, each letter is tried alone; one it still
        refuses is counted and logged and left unacknowledged: its message is redelivered,
        never acknowledged without a row somewhere.
        """
        if not await self._insert_dead_letters_retrying(batch):
            return list(batch)
        stored: list[DeadLetter] = []
        for letter in batch:
            refused = await self._insert_dead_letters_retrying([letter])
            if refused is None:
                stored.append(letter)
                continue
            DEAD_LETTERS_REFUSED.inc()
            log.error(
                "the database refused a dead letter (%s on %s): %s; its message stays "
                "unacknowledged and is redelivered",
                letter.reason,
                letter.topic[:200],
                refused,
            )
        return stored

    async def _insert_dead_letters_retrying(self, batch: Sequence[DeadLetter]) -> str | None:
        return await self._with_retry(
            self._transaction(partial(self._insert_dead_letters, batch=batch))
        )

    async def _drain_dead_letters(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._dead_letters.join(), timeout)
        except TimeoutError:
            log.warning("%d dead letters still pending at shutdown", self._dead_letters.qsize())

    # -- retry ----------------------------------------------------------------------------

    def _transaction(
        self, work: Callable[[AsyncConnection], Awaitable[None]]
    ) -> Callable[[], Awaitable[None]]:
        """One try at running ``work`` in a SQLAlchemy write transaction."""

        async def attempt() -> None:
            conn = await writer_connection(self._engine)
            try:
                async with conn.begin():
                    await work(conn)
                    faults.hit("disk_full")
            finally:
                await conn.close()

        return attempt

    async def _with_retry(self, attempt: Callable[[], Awaitable[None]]) -> str | None:
        """Run ``attempt`` (one write transaction) until it commits.

        Return None on commit, or the error text when the database rejects the data itself
        (retrying would never help). Outages are retried with capped, jittered backoff.
        """
        backoff = Backoff(first_s=DB_RETRY_FIRST_S, max_s=self._retry_max_delay_s)
        while True:
            started = time.perf_counter()
            try:
                await attempt()
            except (
                IntegrityError,
                StatementError,
                DBAPIError,
                sqlite3.Error,
                OSError,
                JSONEncodeError,
            ) as exc:
                if not _is_outage(exc):
                    return str(getattr(exc, "orig", exc) or exc)
                DB_WRITE_ERRORS.inc()
                reason = DISK_FULL if _is_disk_full(exc) else UNAVAILABLE
                self._set_available(False, str(exc).splitlines()[0], reason)
                delay = backoff.next()
                log.warning("database write failed, retrying in %.2fs: %s", delay, self.last_error)
                await asyncio.sleep(delay)
                continue
            DB_QUERY_DURATION.labels(operation="write_batch").observe(time.perf_counter() - started)
            self._set_available(True, "")
            return None

    def _set_available(self, available: bool, error: str, reason: str = UNAVAILABLE) -> None:
        """Record whether writes commit; while they do not, ``reason`` says why
        (``database_unavailable`` or ``disk_full``), reported as ``flux_degraded``."""
        self.last_error = error
        reason = "" if available else reason
        if available == self.available and reason == self.unavailable_reason:
            return
        if not available and reason == DISK_FULL and self.unavailable_reason != DISK_FULL:
            log.error(
                "the disk holding the database is full: nothing is acknowledged until space "
                "is freed (the broker keeps the backlog); retrying"
            )
        self.available = available
        self.unavailable_reason = reason
        for name in (UNAVAILABLE, DISK_FULL):
            DEGRADED.labels(reason=name).set(1 if name == reason else 0)

    @property
    def dead_letters_queued(self) -> int:
        return self._dead_letters.qsize()

    def _set_dead_letter_backlog(self, backlog: bool) -> None:
        self.dead_letter_backlog = backlog
        DEGRADED.labels(reason="dead_letter_backlog").set(1 if backlog else 0)
        log.log(
            logging.WARNING if backlog else logging.INFO,
            "dead-letter queue %s: %d of %d queued",
            "backing up" if backlog else "caught up",
            self._dead_letters.qsize(),
            _DEAD_LETTER_QUEUE,
        )


__all__ = ["DISK_FULL", "REASON_STORE_REJECTED", "UNAVAILABLE", "StoreWriter"]
