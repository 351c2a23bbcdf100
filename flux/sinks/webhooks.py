"""The webhooks sink: rule ``webhook`` actions' POSTs, each retried on its own, then dead-lettered.

A webhook action's request is an outbox row of the built-in sink ``webhooks`` (committed with
the batch that caused it, like every outbox row); nothing is sent from the rule path. Unlike
an ordered sink, each row has its own URL and its own fate: a sender loop claims due rows,
POSTs them (up to ``webhooks.concurrency`` at once) with a total deadline of the request's
``timeout_s``, and then deletes the row (2xx), reschedules it with capped, jittered
exponential backoff (anything else; a numeric ``Retry-After`` on 429/503 is honoured up to
``max_delay_s``), or after ``max_attempts`` moves it to ``dead_letters`` (reason
``webhook_failed``) in the same transaction. Results of concurrent attempts are
group-committed (one fsync for several). At shutdown, attempts still in flight are handed
back (due at once, attempt not counted).

Claiming is a lease: in one short write transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL,
``BEGIN IMMEDIATE`` on SQLite) the row's ``next_attempt_at`` moves to the end of the attempt
plus a margin and ``claim_token`` is set. Several gateway processes can share one PostgreSQL;
a process that dies mid-attempt leaves a lease that expires, and the row is sent again. So
delivery is at least once: receivers deduplicate on the ``x-flux-delivery`` header (the row
id, stable across attempts and restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Self

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from flux import __version__, faults
from flux.config import WebhooksConfig
from flux.metrics import DEAD_LETTERS
from flux.retry import DB_RETRY_FIRST_S, Backoff, exponential_delay
from flux.sinks.metrics import SINK_CONNECTED, SINK_DROPPED, SINK_FAILURES, SINK_SENT
from flux.sinks.outbox import row_created_at
from flux.sinks.rows import OutboxRow
from flux.store.database import writer_connection
from flux.store.schema import dead_letters
from flux.store.schema import outbox as table

if TYPE_CHECKING:
    import httpx


log = logging.getLogger(__name__)

#: The built-in sink's name (``outbox.sink``, the metrics' ``sink`` label).
WEBHOOKS = "webhooks"
REASON_WEBHOOK_FAILED = "webhook_failed"
#: ``dead_letters.source`` of a webhook that was given up on.
SOURCE_WEBHOOK = "webhook"
#: Header carrying the outbox row id (stable across attempts): the receiver's deduplication key.
DELIVERY_HEADER = "x-flux-delivery"
#: Header carrying the attempt number, starting at 1.
ATTEMPT_HEADER = "x-flux-attempt"
#: A claim lasts the request's timeout plus this long before another sender may take the row.
LEASE_MARGIN_S = 30.0

_DB_RETRY_MAX_DELAY_S = 10.0
_MIN_WAIT_S = 0.01
_ERROR_BODY_BYTES = 512
_RELEASE_TIMEOUT_S = 5.0

_SENT = SINK_SENT.labels(sink=WEBHOOKS)
_GAVE_UP = SINK_DROPPED.labels(sink=WEBHOOKS, reason="gave_up")


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    """SQLite hands timestamps back naive; every timestamp flux writes is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class _Claim:
    """A row this process leased for one attempt."""

    id: str
    token: str
    rule_id: str
    event_id: str | None
    url: str
    headers: dict[str, str]
    body: bytes
    timeout_s: float
    attempts: int


@dataclass(frozen=True, slots=True)
class _Outcome:
    ok: bool
    error: str = ""
    retry_after_s: float | None = None
    #: The failure's label in ``flux_sink_failures_total`` (timeout, connect, http_503...).
    reason: str = ""


#: An attempt waiting for the group commit, and the future its delivery task waits on.
_Result = tuple[_Claim, _Outcome, "asyncio.Future[None]"]


def _retry_after(response: httpx.Response) -> float | None:
    """Return a numeric ``Retry-After`` (seconds) of a 429/503, else None."""
    if response.status_code not in (429, 503):
        return None
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class WebhookSink:
    """Deliver the ``webhooks`` sink's rows with retries; an async context manager.

    Rows wait in the table whether or not the sender runs; inside ``async with`` the sender
    delivers them. The sender never raises: a database outage is logged once and retried with
    backoff, a failing endpoint is retried per row.
    """

    name = WEBHOOKS

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        max_attempts: int = 8,
        base_delay_s: float = 1.0,
        max_delay_s: float = 300.0,
        concurrency: int = 4,
        poll_interval_s: float = 1.0,
        client: httpx.AsyncClient | None = None,
        shutdown_timeout_s: float = 10.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if base_delay_s <= 0 or max_delay_s < base_delay_s:
            raise ValueError("need 0 < base_delay_s <= max_delay_s")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if poll_interval_s <= 0 or shutdown_timeout_s < 0:
            raise ValueError("poll_interval_s must be > 0 and shutdown_timeout_s >= 0")
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self.max_attempts = max_attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.concurrency = concurrency
        self.poll_interval_s = poll_interval_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self._given_client = client
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = asyncio.Event()
        self._inflight: dict[str, tuple[_Claim, asyncio.Task[None]]] = {}
        # SQLite has one writer at a time and its busy handler sleeps for milliseconds; our
        # own write transactions take turns here instead.
        self._write_lock = asyncio.Lock() if not self._postgres else None
        self._results: list[_Result] = []
        self._recorder: asyncio.Task[None] | None = None
        self.paused = False
        self.leased = True  # every process may send: rows are claimed one by one
        self.backlog_rows = 0
        self.backlog_bytes = 0
        self._oldest_id: str | None = None
        self.sent = 0
        self.last_error = ""
        self.connected = True
        self.max_bytes = 0  # no size budget: bounded by dead-lettering after max_attempts

    @classmethod
    def from_config(
        cls, config: WebhooksConfig, *, engine: AsyncEngine, shutdown_timeout_s: float
    ) -> WebhookSink:
        """An outbox in ``engine`` with the configured retries and concurrency."""
        return cls(
            engine=engine,
            max_attempts=config.max_attempts,
            base_delay_s=config.base_delay_s,
            max_delay_s=config.max_delay_s,
            concurrency=config.concurrency,
            poll_interval_s=config.poll_interval_s,
            shutdown_timeout_s=shutdown_timeout_s,
        )

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Return whether the sender loop runs."""
        return self._task is not None

    async def __aenter__(self) -> Self:
        if self._task is not None:
            raise RuntimeError("the webhooks sink is already running")
        self._client = self._given_client  # else made on the first delivery
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        SINK_CONNECTED.labels(sink=WEBHOOKS).set(1)
        self._task = asyncio.create_task(self._run(), name="sink:webhooks:send")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        # Let the loop finish a claim it started (cancelling it then would strand the leases).
        self._stopping.set()
        if self._wake is not None:
            self._wake.set()
        _done, still = await asyncio.wait({task}, timeout=self.shutdown_timeout_s)
        if still:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        entries = list(self._inflight.values())
        unfinished: list[_Claim] = []
        if entries:
            _done, still = await asyncio.wait(
                [delivery for _claim, delivery in entries], timeout=self.shutdown_timeout_s
            )
            unfinished = [claim for claim, delivery in entries if delivery in still]
            for delivery in still:
                delivery.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        self._inflight.clear()
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.cancel()
            await asyncio.gather(recorder, return_exceptions=True)
        self._results.clear()
        if unfinished:
            log.warning("%d webhook deliveries unfinished at shutdown", len(unfinished))
            await self._release(unfinished)
        client, self._client = self._client, None
        if client is not None and self._given_client is None:
            await client.aclose()
        self._wake = None

    # -- rows in, and what it reports ----------------------------------------------------

    def committed(self, rows: Sequence[OutboxRow]) -> None:
        """New webhook rows are committed: look for due rows at once."""
        self.backlog_rows += len(rows)
        self.backlog_bytes += sum(row.size for row in rows)
        if self._wake is not None:
            self._wake.set()

    @property
    def full(self) -> bool:
        return False  # bounded by dead-lettering after max_attempts, not by size

    async def wait_for_room(self) -> None:
        return None

    def oldest_age_s(self) -> float:
        if self._oldest_id is None or not self.backlog_rows:
            return 0.0
        return max(0.0, _now().timestamp() - row_created_at(self._oldest_id))

    def send_rate(self) -> float:
        return 0.0

    @property
    def error(self) -> str:
        return self.last_error

    def pause(self) -> None:
        """Stop starting deliveries (rows keep coming in and wait)."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        if self._wake is not None:
            self._wake.set()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        """Run a write transaction (``BEGIN IMMEDIATE`` on SQLite, one at a time here)."""
        async with self._write_lock or contextlib.nullcontext():
            conn = await writer_connection(self._engine)
            try:
                async with conn.begin():
                    yield conn
                    faults.hit("disk_full")
            finally:
                await conn.close()

    # -- sender loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        backoff = Backoff(first_s=DB_RETRY_FIRST_S, max_s=_DB_RETRY_MAX_DELAY_S)
        failing = False
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                wait_s = await self._pump()
            except Exception as exc:
                delay = backoff.next()
                if not failing:
                    failing = True
                    log.warning("webhooks sink cannot read the outbox, retrying: %s", exc)
                else:
                    log.debug("webhooks sink still failing: %s", exc)
                # An enqueue that commits, a finished delivery or stopping ends the pause early.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            if failing:
                failing = False
                backoff.reset()
                log.info("webhooks sink reaches the outbox again")
            if wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait_s)

    async def _pump(self) -> float:
        """Claim and start what is due; return how long to wait before looking again."""
        free = self.concurrency - len(self._inflight)
        if free <= 0 or self.paused:
            return self.poll_interval_s  # a finishing delivery or resume wakes the loop
        pending, size, oldest, next_due = await self._peek()
        self.backlog_rows, self.backlog_bytes, self._oldest_id = pending, size, oldest
        now = _now()
        if next_due is None:
            return self.poll_interval_s
        if next_due > now:
            return min(self.poll_interval_s, max(_MIN_WAIT_S, (next_due - now).total_seconds()))
        claims = await self._claim(free)
        for claim in claims:
            task = asyncio.create_task(self._deliver(claim), name=f"sink:webhooks:{claim.id}")
            self._inflight[claim.id] = (claim, task)
        # Something was due: look again at once, unless another sender holds what is due.
        return 0.0 if claims else min(self.poll_interval_s, _MIN_WAIT_S * 5)

    async def _peek(self) -> tuple[int, int, str | None, datetime | None]:
        """The backlog (rows, bytes, oldest id) and the earliest ``next_attempt_at``."""
        size = func.coalesce(func.sum(func.length(table.c.payload) + func.length(table.c.topic)), 0)
        query = select(
            func.count(), size, func.min(table.c.id), func.min(table.c.next_attempt_at)
        ).where(table.c.sink == WEBHOOKS)
        async with self._engine.connect() as conn:
            count, total, oldest, earliest = (await conn.execute(query)).one()
        due = None if earliest is None else _aware(earliest)
        return int(count), int(total), oldest, due

    async def _claim(self, limit: int) -> list[_Claim]:
        """Lease up to ``limit`` due rows in one write transaction."""
        token = uuid.uuid4().hex
        now = _now()
        query = (
            select(
                table.c.id,
                table.c.rule_id,
                table.c.event_id,
                table.c.topic,
                table.c.headers,
                table.c.payload,
                table.c.timeout_s,
                table.c.attempts,
            )
            .where(table.c.sink == WEBHOOKS, table.c.next_attempt_at <= now)
            .order_by(table.c.next_attempt_at, table.c.id)
            .limit(limit)
        )
        if self._postgres:
            query = query.with_for_update(skip_locked=True)
        lease = (
            update(table)
            .where(table.c.id == bindparam("row_id"))
            .values(claim_token=token, next_attempt_at=bindparam("lease_until"))
        )
        async with self._transaction() as conn:
            rows = (await conn.execute(query)).all()
            if rows:
                await conn.execute(
                    lease,
                    [
                        {
                            "row_id": row.id,
                            "lease_until": now
                            + timedelta(seconds=(row.timeout_s or 0) + LEASE_MARGIN_S),
                        }
                        for row in rows
                    ],
                )
        return [
            _Claim(
                id=row.id,
                token=token,
                rule_id=row.rule_id or "",
                event_id=row.event_id,
                url=row.topic,
                headers=dict(row.headers or {}),
                body=bytes(row.payload),
                timeout_s=float(row.timeout_s or 5.0),
                attempts=int(row.attempts),
            )
            for row in rows
        ]

    # -- one attempt ----------------------------------------------------------------------

    async def _deliver(self, claim: _Claim) -> None:
        try:
            outcome = await self._post(claim)
            await self._record_with_retry(claim, outcome)
        except Exception:  # a bug, not an endpoint or database failure: keep the loop alive
            log.exception("webhook delivery %d failed unexpectedly", claim.id)
        finally:
            self._inflight.pop(claim.id, None)
            if self._wake is not None:
                self._wake.set()

    async def _post(self, claim: _Claim) -> _Outcome:
        """POST once with a total deadline of the request's timeout; never raise."""
        import httpx  # here, not at import: memory most gateways never need

        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=False, headers={"user-agent": f"flux/{__version__}"}
            )
        headers = {
            **claim.headers,
            DELIVERY_HEADER: str(claim.id),
            ATTEMPT_HEADER: str(claim.attempts + 1),
        }
        try:
            async with asyncio.timeout(claim.timeout_s):
                request = self._client.build_request(
                    "POST", claim.url, content=claim.body, headers=headers, timeout=claim.timeout_s
                )
                response = await self._client.send(request, stream=True)
                try:
                    if response.is_success:
                        return _Outcome(ok=True)
                    excerpt = b""
                    async for chunk in response.aiter_raw():
                        excerpt += chunk
                        if len(excerpt) >= _ERROR_BODY_BYTES:
                            break
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException):
            return _Outcome(
                ok=False, error=f"no response within {claim.timeout_s:g}s", reason="timeout"
            )
        except Exception as exc:  # refused, reset, bad URL or header: all worth a retry
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            return _Outcome(ok=False, error=error, reason="connect")
        text = excerpt[:_ERROR_BODY_BYTES].decode("utf-8", "replace").strip()
        error = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
        return _Outcome(
            ok=False,
            error=f"{error}: {text}" if text else error,
            retry_after_s=_retry_after(response),
            reason=f"http_{response.status_code}",
        )

    def backoff_s(self, attempts: int, retry_after_s: float | None = None) -> float:
        """Return the delay before attempt ``attempts + 1``: capped exponential, jittered."""
        delay = exponential_delay(attempts, first_s=self.base_delay_s, max_s=self.max_delay_s)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.max_delay_s))
        return delay

    async def _record_with_retry(self, claim: _Claim, outcome: _Outcome) -> None:
        """Hand the attempt's result to the group commit and wait until it is durable."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._results.append((claim, outcome, future))
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._record_loop(), name="sink:webhooks:record")
        await future

    async def _record_loop(self) -> None:
        """Commit every waiting result in one transaction (one fsync), retrying through outages."""
        backoff = Backoff(first_s=DB_RETRY_FIRST_S, max_s=_DB_RETRY_MAX_DELAY_S)
        while self._results:
            batch, self._results = self._results, []
            while True:
                try:
                    recorded = await self._record(batch)
                    break
                except Exception as exc:
                    delay = backoff.next()
                    log.warning(
                        "could not record %d webhook attempts, retrying in %.2fs: %s",
                        len(batch),
                        delay,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                    )
                    await asyncio.sleep(delay)
            backoff.reset()
            for (claim, outcome, future), (owned, gave_up) in zip(batch, recorded, strict=True):
                self._count(claim, outcome, owned=owned, gave_up=gave_up)
                if not future.done():
                    future.set_result(None)

    async def _record(self, batch: Sequence[_Result]) -> list[tuple[bool, bool]]:
        """Delete, reschedule or dead-letter each row still ours; return (owned, gave_up)."""
        now = _now()
        recorded: list[tuple[bool, bool]] = []
        async with self._transaction() as conn:
            for claim, outcome, _future in batch:
                ours = (table.c.id == claim.id) & (table.c.claim_token == claim.token)
                attempts = claim.attempts + 1
                gave_up = not outcome.ok and attempts >= self.max_attempts
                if outcome.ok or gave_up:
                    result = await conn.execute(delete(table).where(ours))
                else:
                    delay = self.backoff_s(attempts, outcome.retry_after_s)
                    result = await conn.execute(
                        update(table)
                        .where(ours)
                        .values(
                            attempts=attempts,
                            next_attempt_at=now + timedelta(seconds=delay),
                            claim_token=None,
                            last_error=outcome.error,
                        )
                    )
                owned = result.rowcount == 1
                if owned and gave_up:
                    await conn.execute(insert(dead_letters), [self._dead_letter(claim, outcome)])
                recorded.append((owned, gave_up))
        return recorded

    def _count(self, claim: _Claim, outcome: _Outcome, *, owned: bool, gave_up: bool) -> None:
        if not owned:
            log.warning(
                "webhook delivery %d: the lease expired and another sender took the row; "
                "this attempt's result is dropped",
                claim.id,
            )
        elif outcome.ok:
            _SENT.inc()
            self.sent += 1
            self.backlog_rows = max(0, self.backlog_rows - 1)
        elif gave_up:
            _GAVE_UP.inc()
            self.backlog_rows = max(0, self.backlog_rows - 1)
            DEAD_LETTERS.labels(reason=REASON_WEBHOOK_FAILED).inc()
            log.warning(
                "webhook %d of rule %s to %s given up after %d attempts: %s",
                claim.id,
                claim.rule_id,
                claim.url,
                claim.attempts + 1,
                outcome.error,
            )
        if not outcome.ok and owned:
            self.last_error = outcome.error
            SINK_FAILURES.labels(sink=WEBHOOKS, reason=outcome.reason).inc()

    def _dead_letter(self, claim: _Claim, outcome: _Outcome) -> dict[str, Any]:
        detail = (
            f"gave up after {claim.attempts + 1} attempts to POST {claim.url} "
            f"(rule {claim.rule_id}, event {claim.event_id}); last error: {outcome.error}"
        )
        return {
            "topic": claim.url[:1024],
            "payload": claim.body,
            "reason": REASON_WEBHOOK_FAILED,
            "detail": detail,
            "source": SOURCE_WEBHOOK,
            "received_at": _now(),
        }

    async def _release(self, claims: Sequence[_Claim]) -> None:
        """Hand unfinished claims back (due now, attempts unchanged); best effort."""
        statement = (
            update(table)
            .where(
                (table.c.id == bindparam("row_id")) & (table.c.claim_token == bindparam("token"))
            )
            .values(claim_token=None, next_attempt_at=bindparam("due"))
        )
        now = _now()
        try:
            async with asyncio.timeout(_RELEASE_TIMEOUT_S):
                async with self._transaction() as conn:
                    await conn.execute(
                        statement,
                        [{"row_id": c.id, "token": c.token, "due": now} for c in claims],
                    )
        except Exception as exc:
            log.warning(
                "could not release %d webhook claims (sent again once their lease ends): %s",
                len(claims),
                exc,
            )


__all__ = [
    "ATTEMPT_HEADER",
    "DELIVERY_HEADER",
    "LEASE_MARGIN_S",
    "REASON_WEBHOOK_FAILED",
    "SOURCE_WEBHOOK",
    "WEBHOOKS",
    "WebhookSink",
]
