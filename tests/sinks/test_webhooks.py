"""The webhooks sink against a real local HTTP server and real SQLite files and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from flux.config import DatabaseConfig
from flux.events import Event, new_event_id
from flux.rules import Rule, RuleMatch
from flux.rules.actions import WebhookRequest, webhook_request
from flux.rules.model import WebhookAction
from flux.sinks.rows import OutboxRow, new_row_id
from flux.sinks.webhooks import DELIVERY_HEADER, WEBHOOKS, WebhookSink
from flux.store.database import create_engine
from flux.store.migrate import upgrade
from flux.store.outbox import outbox_values
from flux.store.schema import dead_letters, outbox
from tests.harness import HookServer, free_port, wait_until


@pytest.fixture
async def server() -> AsyncIterator[HookServer]:
    hooks = HookServer()
    await hooks.start()
    yield hooks
    await hooks.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/flux.db"
    return str(request.getfixturevalue("pg_url"))


async def _engine(url: str, *, migrate: bool = True) -> AsyncEngine:
    config = DatabaseConfig(url=url)
    if migrate:
        await asyncio.to_thread(upgrade, config)
    return create_engine(config)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    db = await _engine(database_url)
    yield db
    await db.dispose()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def delivered() -> float:
    return metric("flux_sink_sent_total", sink=WEBHOOKS)


def failures(reason: str) -> float:
    return metric("flux_sink_failures_total", sink=WEBHOOKS, reason=reason)


def gave_up() -> float:
    return metric("flux_sink_dropped_total", sink=WEBHOOKS, reason="gave_up")


RULE = Rule(id="hook", topic="devices/+/telemetry", when="temperature > 30")


def match_for(payload: dict[str, Any]) -> RuleMatch:
    event = Event(
        id=new_event_id(),
        topic="devices/d1/telemetry",
        device_id="d1",
        payload=payload,
        raw=orjson.dumps(payload),
        received_at=time.time(),
        source="mqtt",
    )
    return RuleMatch(RULE, event, {"why": "hot"}, 3)


def request_to(url: str, body: dict[str, Any], *, timeout_s: float = 5.0) -> WebhookRequest:
    return WebhookRequest(
        url=url,
        body=orjson.dumps(body),
        headers={"content-type": "application/json"},
        timeout_s=timeout_s,
    )


def row_for(
    request: WebhookRequest, *, rule_id: str = "r", event_id: str | None = None
) -> OutboxRow:
    return OutboxRow(
        id=new_row_id(),
        sink=WEBHOOKS,
        topic=request.url,
        payload=request.body,
        created_at=time.time(),
        rule_id=rule_id,
        event_id=event_id,
        headers=dict(request.headers),
        timeout_s=request.timeout_s,
    )


async def enqueue(
    engine: AsyncEngine,
    sink: WebhookSink,
    requests: list[WebhookRequest],
    *,
    rule_id: str = "r",
    event_id: str | None = None,
) -> None:
    """Commit webhook rows as the store does with an event batch, then tell the sink."""
    rows = [row_for(request, rule_id=rule_id, event_id=event_id) for request in requests]
    async with engine.begin() as conn:
        await conn.execute(insert(outbox), [outbox_values(row) for row in rows])
    sink.committed(rows)


async def outbox_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(outbox))).all())


async def dead_letter_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(dead_letters))).all())


async def pending(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(outbox))).scalar_one())


async def outbox_empty(engine: AsyncEngine) -> bool:
    return await pending(engine) == 0


async def test_delivers_once_with_the_json_body(engine: AsyncEngine, server: HookServer) -> None:
    action = WebhookAction(type="webhook", url=server.url, headers={"x-token": "s3cret"})
    match = match_for({"temperature": 31.5})
    sent = delivered()
    async with WebhookSink(engine=engine, poll_interval_s=0.05) as sink:
        await enqueue(engine, sink, [webhook_request(match, action)], rule_id="hook")
        await wait_until(lambda: outbox_empty(engine), what="outbox drained")
    assert len(server.received) == 1
    hook = server.received[0]
    assert hook.path == "/hook"
    assert hook.method == "POST"
    assert hook.headers["content-type"] == "application/json"
    assert hook.headers["x-token"] == "s3cret"
    assert hook.headers["x-flux-attempt"] == "1"
    document = orjson.loads(hook.body)
    assert document["rule_id"] == "hook"
    assert document["event_id"] == match.event.id
    assert document["device_id"] == "d1"
    assert document["payload"] == {"temperature": 31.5}
    assert document["output"] == {"why": "hot"}
    assert document["ruleset_version"] == 3
    assert delivered() - sent == 1
    assert await dead_letter_rows(engine) == []


async def test_retried_on_500_then_delivered(engine: AsyncEngine, server: HookServer) -> None:
    server.statuses = [500, 503]
    refused = failures("http_500") + failures("http_503")
    sent = delivered()
    async with WebhookSink(
        engine=engine, max_attempts=5, base_delay_s=0.01, max_delay_s=0.05, poll_interval_s=0.05
    ) as sink:
        await enqueue(engine, sink, [request_to(server.url, {"n": 1})])
        await wait_until(lambda: outbox_empty(engine), what="delivered after retries")
    assert [r.headers["x-flux-attempt"] for r in server.received] == ["1", "2", "3"]
    assert len({r.headers[DELIVERY_HEADER] for r in server.received}) == 1
    assert all(orjson.loads(r.body) == {"n": 1} for r in server.received)
    assert failures("http_500") + failures("http_503") - refused == 2
    assert delivered() - sent == 1
    assert await dead_letter_rows(engine) == []


async def test_gives_up_into_dead_letters(engine: AsyncEngine, server: HookServer) -> None:
    server.default_status = 500
    server.answer_body = b"boom"
    dropped = gave_up()
    dead = metric("flux_dead_letters_total", reason="webhook_failed")
    body = {"alarm": "overheat"}
    async with WebhookSink(
        engine=engine, max_attempts=3, base_delay_s=0.01, max_delay_s=0.02, poll_interval_s=0.05
    ) as sink:
        await enqueue(engine, sink, [request_to(server.url, body)], rule_id="r1", event_id="e" * 32)

        async def dead_lettered() -> bool:
            return len(await dead_letter_rows(engine)) == 1

        await wait_until(dead_lettered, what="dead letter written")
        assert await pending(engine) == 0
    assert len(server.received) == 3
    (letter,) = await dead_letter_rows(engine)
    assert letter.reason == "webhook_failed"
    assert letter.source == "webhook"
    assert letter.topic == server.url
    assert orjson.loads(letter.payload) == body
    assert "3 attempts" in letter.detail
    assert "HTTP 500 Internal Server Error: boom" in letter.detail
    assert "rule r1" in letter.detail
    assert gave_up() - dropped == 1
    assert metric("flux_dead_letters_total", reason="webhook_failed") - dead == 1


async def test_timeout_is_honoured(engine: AsyncEngine, server: HookServer) -> None:
    server.hang = True
    async with WebhookSink(
        engine=engine, max_attempts=2, base_delay_s=0.01, max_delay_s=0.02, poll_interval_s=0.05
    ) as sink:
        await enqueue(engine, sink, [request_to(server.url, {"x": 1}, timeout_s=0.2)])

        async def dead_lettered() -> bool:
            return len(await dead_letter_rows(engine)) == 1

        await wait_until(dead_lettered, what="timed-out webhook dead-lettered")
    assert len(server.received) == 2
    (letter,) = await dead_letter_rows(engine)
    assert "no response within 0.2s" in letter.detail


async def test_pending_webhooks_survive_a_restart(database_url: str) -> None:
    port = free_port()
    server = HookServer(port)  # not listening yet: connection refused
    first_engine = await _engine(database_url)
    try:
        async with WebhookSink(
            engine=first_engine, max_attempts=50, base_delay_s=0.05, max_delay_s=0.1
        ) as sink:
            await enqueue(first_engine, sink, [request_to(server.url, {"kept": True})])

            async def failed_once() -> bool:
                rows = await outbox_rows(first_engine)
                return len(rows) == 1 and rows[0].attempts >= 1

            await wait_until(failed_once, what="a refused attempt recorded")
        (row,) = await outbox_rows(first_engine)
        assert "ConnectError" in row.last_error
        assert row.claim_token is None
    finally:
        await first_engine.dispose()

    await server.start()
    second_engine = await _engine(database_url)  # a new process, as far as the outbox knows
    try:
        async with WebhookSink(
            engine=second_engine, base_delay_s=0.05, max_delay_s=0.1, poll_interval_s=0.05
        ):
            await wait_until(lambda: outbox_empty(second_engine), what="delivered after restart")
        assert len(server.received) == 1
        assert orjson.loads(server.received[0].body) == {"kept": True}
        assert int(server.received[0].headers["x-flux-attempt"]) >= 2
    finally:
        await second_engine.dispose()
        await server.stop()


async def test_in_flight_delivery_is_handed_back_at_shutdown(
    engine: AsyncEngine, server: HookServer
) -> None:
    server.hang = True
    async with WebhookSink(engine=engine, shutdown_timeout_s=0, poll_interval_s=0.05) as sink:
        await enqueue(engine, sink, [request_to(server.url, {"y": 2}, timeout_s=30)])
        await wait_until(lambda: len(server.received) == 1, what="request in flight")
    (row,) = await outbox_rows(engine)
    assert (row.attempts, row.claim_token) == (0, None)  # released, not counted as a failure
    server.hang = False
    async with WebhookSink(engine=engine, poll_interval_s=0.05):
        await wait_until(lambda: outbox_empty(engine), what="delivered by the next sender")
    assert len(server.received) == 2
    assert server.received[1].headers["x-flux-attempt"] == "1"


async def test_two_senders_on_one_database_deliver_each_once(
    database_url: str, server: HookServer
) -> None:
    engines = [await _engine(database_url), await _engine(database_url, migrate=False)]
    try:
        async with (
            WebhookSink(engine=engines[0], concurrency=4, poll_interval_s=0.02) as first,
            WebhookSink(engine=engines[1], concurrency=4, poll_interval_s=0.02) as _second,
        ):
            requests = [request_to(server.url, {"i": i}) for i in range(40)]
            await enqueue(engines[0], first, requests)
            await wait_until(lambda: outbox_empty(engines[0]), what="all 40 delivered")
        ids = [r.headers[DELIVERY_HEADER] for r in server.received]
        assert len(ids) == 40 and len(set(ids)) == 40
        assert sorted(orjson.loads(r.body)["i"] for r in server.received) == list(range(40))
    finally:
        for db in engines:
            await db.dispose()


async def test_the_sender_outlives_a_database_error(tmp_path: Any, server: HookServer) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/late.db"
    await asyncio.to_thread(upgrade, DatabaseConfig(url=url), "0001")
    engine = await _engine(url, migrate=False)  # no outbox table yet: every poll fails
    try:
        async with WebhookSink(engine=engine, poll_interval_s=0.05) as sink:
            assert sink.running
            await asyncio.to_thread(upgrade, DatabaseConfig(url=url))
            await enqueue(engine, sink, [request_to(server.url, {"late": 1})])
            await wait_until(
                lambda: len(server.received) == 1, what="delivered once the table exists"
            )
            await wait_until(lambda: outbox_empty(engine), what="row deleted")
    finally:
        await engine.dispose()


async def test_refuses_reentry_and_bad_settings(engine: AsyncEngine) -> None:
    sink = WebhookSink(engine=engine)
    async with sink:
        with pytest.raises(RuntimeError, match="already running"):
            await sink.__aenter__()
    with pytest.raises(ValueError):
        WebhookSink(engine=engine, max_attempts=0)
    with pytest.raises(ValueError):
        WebhookSink(engine=engine, base_delay_s=5, max_delay_s=1)


def test_backoff_is_capped_exponential_with_jitter(tmp_path: Any) -> None:
    engine = create_engine(DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/b.db"))
    sink = WebhookSink(engine=engine, base_delay_s=1, max_delay_s=30)
    for attempts in range(1, 200):
        ceiling = min(30.0, 2.0 ** (attempts - 1))
        assert ceiling / 2 <= sink.backoff_s(attempts) <= ceiling
    assert sink.backoff_s(1, retry_after_s=20) == 20
    assert sink.backoff_s(1, retry_after_s=1000) == 30
