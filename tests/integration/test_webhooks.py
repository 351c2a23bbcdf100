"""The webhook outbox against a real local HTTP server and real SQLite files and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from flux.config import DatabaseConfig
from flux.events import Event, new_event_id
from flux.rules import ActionExecutor, Rule, RuleMatch
from flux.rules.actions import WebhookRequest
from flux.rules.model import WebhookAction
from flux.store.database import create_engine
from flux.store.migrate import upgrade
from flux.store.schema import dead_letters, webhook_outbox
from flux.webhooks import DELIVERY_HEADER, WebhookOutbox
from tests.hook_server import HookServer
from tests.support import free_port, wait_until


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


def deliveries(result: str) -> float:
    return metric("flux_webhook_deliveries_total", result=result)


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


async def outbox_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(webhook_outbox))).all())


async def dead_letter_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(dead_letters))).all())


async def outbox_empty(outbox: WebhookOutbox) -> bool:
    return await outbox.pending() == 0


async def test_delivers_once_with_the_json_body(engine: AsyncEngine, server: HookServer) -> None:
    action = WebhookAction(type="webhook", url=server.url, headers={"x-token": "s3cret"})
    match = match_for({"temperature": 31.5})
    delivered = deliveries("delivered")
    async with WebhookOutbox(engine=engine, poll_interval_s=0.05) as outbox:
        await outbox.handler(match, action)
        await wait_until(lambda: outbox_empty(outbox), what="outbox drained")
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
    assert deliveries("delivered") - delivered == 1
    assert await dead_letter_rows(engine) == []


async def test_handler_queues_through_the_executor(engine: AsyncEngine, server: HookServer) -> None:
    executor = ActionExecutor()
    rule = RULE.model_copy(
        update={"actions": (WebhookAction(type="webhook", url=server.url, timeout_s=2),)}
    )
    match = match_for({"temperature": 40})._replace(rule=rule)
    async with WebhookOutbox(engine=engine, poll_interval_s=0.05) as outbox:
        unregister = executor.register("webhook", outbox.handler)
        report = await executor.execute([match])
        assert (report.ok, report.failed) == (1, 0)
        await wait_until(lambda: outbox_empty(outbox), what="outbox drained")
        unregister()
    assert executor.handler_count == 0
    assert len(server.received) == 1
    assert orjson.loads(server.received[0].body)["payload"] == {"temperature": 40}
    await wait_until(
        lambda: metric("flux_webhook_outbox_pending") == 0, what="pending gauge back to 0"
    )


async def test_retried_on_500_then_delivered(engine: AsyncEngine, server: HookServer) -> None:
    server.statuses = [500, 503]
    retries, delivered = deliveries("retry"), deliveries("delivered")
    async with WebhookOutbox(
        engine=engine, max_attempts=5, base_delay_s=0.01, max_delay_s=0.05, poll_interval_s=0.05
    ) as outbox:
        await outbox.enqueue([request_to(server.url, {"n": 1})], rule_id="r", event_id=None)
        await wait_until(lambda: outbox_empty(outbox), what="delivered after retries")
    assert [r.headers["x-flux-attempt"] for r in server.received] == ["1", "2", "3"]
    assert len({r.headers[DELIVERY_HEADER] for r in server.received}) == 1
    assert all(orjson.loads(r.body) == {"n": 1} for r in server.received)
    assert deliveries("retry") - retries == 2
    assert deliveries("delivered") - delivered == 1
    assert await dead_letter_rows(engine) == []


async def test_gives_up_into_dead_letters(engine: AsyncEngine, server: HookServer) -> None:
    server.default_status = 500
    server.answer_body = b"boom"
    gave_up = deliveries("gave_up")
    dead = metric("flux_dead_letters_total", reason="webhook_failed")
    body = {"alarm": "overheat"}
    async with WebhookOutbox(
        engine=engine, max_attempts=3, base_delay_s=0.01, max_delay_s=0.02, poll_interval_s=0.05
    ) as outbox:
        await outbox.enqueue([request_to(server.url, body)], rule_id="r1", event_id="e" * 32)

        async def dead_lettered() -> bool:
            return len(await dead_letter_rows(engine)) == 1

        await wait_until(dead_lettered, what="dead letter written")
        assert await outbox.pending() == 0
    assert len(server.received) == 3
    (letter,) = await dead_letter_rows(engine)
    assert letter.reason == "webhook_failed"
    assert letter.source == "webhook"
    assert letter.topic == server.url
    assert orjson.loads(letter.payload) == body
    assert "3 attempts" in letter.detail
    assert "HTTP 500 Internal Server Error: boom" in letter.detail
    assert "rule r1" in letter.detail
    assert deliveries("gave_up") - gave_up == 1
    assert metric("flux_dead_letters_total", reason="webhook_failed") - dead == 1


async def test_timeout_is_honoured(engine: AsyncEngine, server: HookServer) -> None:
    server.hang = True
    async with WebhookOutbox(
        engine=engine, max_attempts=2, base_delay_s=0.01, max_delay_s=0.02, poll_interval_s=0.05
    ) as outbox:
        await outbox.enqueue(
            [request_to(server.url, {"x": 1}, timeout_s=0.2)], rule_id="slow", event_id=None
        )

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
        async with WebhookOutbox(
            engine=first_engine, max_attempts=50, base_delay_s=0.05, max_delay_s=0.1
        ) as outbox:
            await outbox.enqueue(
                [request_to(server.url, {"kept": True})], rule_id="r", event_id=None
            )

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
        async with WebhookOutbox(
            engine=second_engine, base_delay_s=0.05, max_delay_s=0.1, poll_interval_s=0.05
        ) as outbox:
            await wait_until(lambda: outbox_empty(outbox), what="delivered after restart")
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
    async with WebhookOutbox(engine=engine, shutdown_timeout_s=0, poll_interval_s=0.05) as outbox:
        await outbox.enqueue(
            [request_to(server.url, {"y": 2}, timeout_s=30)], rule_id="r", event_id=None
        )
        await wait_until(lambda: len(server.received) == 1, what="request in flight")
    (row,) = await outbox_rows(engine)
    assert (row.attempts, row.claim_token) == (0, None)  # released, not counted as a failure
    server.hang = False
    async with WebhookOutbox(engine=engine, poll_interval_s=0.05) as outbox:
        await wait_until(lambda: outbox_empty(outbox), what="delivered by the next outbox")
    assert len(server.received) == 2
    assert server.received[1].headers["x-flux-attempt"] == "1"


async def test_two_senders_on_one_database_deliver_each_once(
    database_url: str, server: HookServer
) -> None:
    engines = [await _engine(database_url), await _engine(database_url, migrate=False)]
    try:
        async with (
            WebhookOutbox(engine=engines[0], concurrency=4, poll_interval_s=0.02) as first,
            WebhookOutbox(engine=engines[1], concurrency=4, poll_interval_s=0.02) as _second,
        ):
            requests = [request_to(server.url, {"i": i}) for i in range(40)]
            await first.enqueue(requests, rule_id="r", event_id=None)
            await wait_until(lambda: outbox_empty(first), what="all 40 delivered")
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
        async with WebhookOutbox(engine=engine, poll_interval_s=0.05) as outbox:
            assert outbox.running
            await asyncio.to_thread(upgrade, DatabaseConfig(url=url))
            await outbox.enqueue([request_to(server.url, {"late": 1})], rule_id="r", event_id=None)
            await wait_until(
                lambda: len(server.received) == 1, what="delivered once the table exists"
            )
            await wait_until(lambda: outbox_empty(outbox), what="row deleted")
    finally:
        await engine.dispose()


async def test_refuses_reentry_and_bad_settings(engine: AsyncEngine) -> None:
    outbox = WebhookOutbox(engine=engine)
    async with outbox:
        with pytest.raises(RuntimeError, match="already running"):
            await outbox.__aenter__()
    with pytest.raises(ValueError):
        WebhookOutbox(engine=engine, max_attempts=0)
    with pytest.raises(ValueError):
        WebhookOutbox(engine=engine, base_delay_s=5, max_delay_s=1)


def test_backoff_is_capped_exponential_with_jitter(tmp_path: Any) -> None:
    engine = create_engine(DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/b.db"))
    outbox = WebhookOutbox(engine=engine, base_delay_s=1, max_delay_s=30)
    for attempts in range(1, 200):
        ceiling = min(30.0, 2.0 ** (attempts - 1))
        assert ceiling / 2 <= outbox.backoff_s(attempts) <= ceiling
    assert outbox.backoff_s(1, retry_after_s=20) == 20
    assert outbox.backoff_s(1, retry_after_s=1000) == 30
