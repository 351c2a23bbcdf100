"""Every instance sharing a database: a rule created through one is evaluated by the other,
and a device whose messages move to another instance keeps its rule state.

Two real ``flux run`` processes share one PostgreSQL database (``LISTEN/NOTIFY``), or one
SQLite file (the version row read twice a second).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from flux.app import Gateway
from flux.store.schema import alerts
from tests.harness import Db, GatewayProcess, make_settings, unique, wait_until
from tests.harness import write_config as _write_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED_RULES = sorted((REPO / "rules").glob("*.toml"))

Start = Callable[[str], GatewayProcess]


@asynccontextmanager
async def instances(
    tmp_path: Path, broker: tuple[str, int], database_url: str
) -> AsyncIterator[Start]:
    """Start gateway processes on one database (the shipped rules, no plugins)."""
    started: list[GatewayProcess] = []

    def start(name: str) -> GatewayProcess:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "rules").mkdir()
        for path in SHIPPED_RULES:
            (directory / "rules" / path.name).write_text(path.read_text())
        config = _write_config(
            directory, mqtt_port=broker[1], dev=unique("dev"), database_url=database_url
        )
        gateway = GatewayProcess(config, name=name)
        started.append(gateway)
        gateway.start()
        return gateway

    try:
        yield start
    finally:
        for gateway in started:
            gateway.kill()


async def post(gateway: GatewayProcess, device: str, payload: dict[str, object]) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
        topic = f"devices/{device}/telemetry"
        response = await client.post("/api/v1/event", json={"topic": topic, "payload": payload})
        assert response.status_code == 201, response.text


async def alerts_of(db: Db, rule_id: str, device: str) -> int:
    return await db.count(alerts, (alerts.c.rule_id == rule_id) & (alerts.c.device_id == device))


async def rule_created_on_one_is_evaluated_by_the_other(
    tmp_path: Path, broker: tuple[str, int], database_url: str
) -> float:
    db = Db(database_url)
    try:
        async with instances(tmp_path, broker, database_url) as start:
            # Both start at once on a new database: one migrates it, the other waits for it.
            first, second = start("a"), start("b")
            await asyncio.gather(first.wait_ready(), second.wait_ready())
            rule = {
                "id": unique("synced-"),
                "topic": "devices/+/telemetry",
                "when": "pressure > 1000",
                "actions": [{"type": "alert", "severity": "info"}],
            }
            async with (
                httpx.AsyncClient(base_url=first.base_url, timeout=30) as a,
                httpx.AsyncClient(base_url=second.base_url, timeout=30) as b,
            ):
                created = await a.post("/api/v1/rules", json=rule)
                assert created.status_code == 201, created.text
                made = time.monotonic()

                async def known_to_b() -> bool:
                    return (await b.get(f"/api/v1/rules/{rule['id']}")).status_code == 200

                await wait_until(known_to_b, timeout=10, what="b reloading")
                delay = time.monotonic() - made
            device = unique("dev")
            await post(second, device, {"pressure": 1013})
            rule_id = str(rule["id"])
            await wait_until(lambda: alerts_of(db, rule_id, device), timeout=10, what="b's alert")
            return delay
    finally:
        await db.close()


async def test_a_rule_created_on_one_postgres_instance_reaches_the_other_within_a_second(
    tmp_path: Path, broker: tuple[str, int], pg_url: str
) -> None:
    delay = await rule_created_on_one_is_evaluated_by_the_other(tmp_path, broker, pg_url)
    print(f"\nPostgreSQL (LISTEN/NOTIFY): the other instance had the rule after {delay:.3f} s")
    assert delay < 1.0


async def test_a_rule_created_on_one_sqlite_instance_reaches_the_other(
    tmp_path: Path, broker: tuple[str, int]
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/shared.db"
    delay = await rule_created_on_one_is_evaluated_by_the_other(tmp_path, broker, url)
    print(f"\nSQLite (version row read twice a second): the other had it after {delay:.3f} s")


async def device_moves(tmp_path: Path, broker: tuple[str, int], url: str) -> None:
    """A device's reading through instance a, a stopped; the next through b fires the rate
    rule: b read the reference reading a left in the database."""
    db = Db(url)
    device = unique("dev")
    now = time.time()
    try:
        async with instances(tmp_path, broker, url) as start:
            first = start("a")
            await first.wait_ready()
            second = start("b")  # both running before the device appears
            await second.wait_ready()
            await post(first, device, {"temperature": 20.0, "ts": now - 60})
            first.signal(signal.SIGTERM)
            assert await first.wait_exit() == 0, first.log()[-3000:]
            # The next reading, 30 s later and 3 degC warmer (6 degC a minute), through b.
            await post(second, device, {"temperature": 23.0, "ts": now - 30})
            rule = "temperature-rising-fast"
            await wait_until(lambda: alerts_of(db, rule, device), timeout=10, what="the alert")
            assert await alerts_of(db, rule, device) == 1
    finally:
        await db.close()


async def test_a_device_moved_to_another_postgres_instance_keeps_its_rate_reference(
    tmp_path: Path, broker: tuple[str, int], pg_url: str
) -> None:
    await device_moves(tmp_path, broker, pg_url)


async def test_a_device_moved_to_another_sqlite_instance_keeps_its_rate_reference(
    tmp_path: Path, broker: tuple[str, int]
) -> None:
    await device_moves(tmp_path, broker, f"sqlite+aiosqlite:///{tmp_path}/shared.db")


async def test_stateful_rules_on_a_shared_subscription_are_warned_about(
    tmp_path: Path, broker: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "rules").mkdir()
    for path in SHIPPED_RULES:
        (tmp_path / "rules" / path.name).write_text(path.read_text())
    shared = make_settings(tmp_path, broker, mqtt={"shared_group": unique("g")})
    with caplog.at_level(logging.WARNING, logger="flux.app"):
        async with Gateway(settings=shared):
            pass
    warnings = [r.getMessage() for r in caplog.records if "shared subscription" in r.getMessage()]
    assert len(warnings) == 1 and "temperature-rising-fast" in warnings[0]
    assert "hash_clientid" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flux.app"):
        async with Gateway(settings=make_settings(tmp_path, broker)):
            pass
    assert not [r for r in caplog.records if "shared subscription" in r.getMessage()]
