"""Rule state rows through the store: committed with an event batch (state tables with
number keys included), the last row of a key winning, and read back with their versions, on
a real SQLite file and a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flux.config import DatabaseConfig
from flux.events import Event, make_event
from flux.rules.state import StateRow
from flux.store.database import create_engine
from flux.store.migrate import upgrade_async
from flux.store.rule_state import load_keys, load_rule_state, purge_stale, write_rule_state
from flux.store.writer import StoreWriter


def _event(device: str) -> Event:
    event = make_event(f"devices/{device}/t", b'{"t": 1}', max_bytes=1024, source="mqtt")
    assert isinstance(event, Event)
    return event


def _row(key: str, value: Any, version: int = 1) -> StateRow:
    return StateRow("ring", "script", key, "fp", value, version)


async def _round_trip(url: str) -> None:
    config = DatabaseConfig(url=url)
    await upgrade_async(config)
    engine = create_engine(config)
    acked: list[str] = []
    try:
        async with StoreWriter(engine=engine) as writer:
            rows = [
                _row("a", {"n": 1}),
                _row("b", [[1, 20.5], ["tag", "x"]]),  # state[1] = 20.5: number keys
                _row("a", {"n": 2}, version=2),
            ]
            writer.add_rows(state=rows, confirm=lambda: acked.append("state"))
            event = _event("a")
            event.ack = lambda: acked.append("event")
            await writer.write_batch([event])
            assert acked == ["state", "event"], "the rows commit with the batch, then its ack"
            writer.add_rows(state=[_row("b", None)], confirm=lambda: acked.append("gone"))
            await writer.write_batch([_event("b")])
        assert await load_rule_state(engine) == [_row("a", {"n": 2}, version=2)]
        assert await load_keys(engine, "script", ["a", "zz"]) == [_row("a", {"n": 2}, version=2)]
    finally:
        await engine.dispose()


async def test_sqlite_commits_rule_state_with_the_batch(tmp_path: Path) -> None:
    await _round_trip(f"sqlite+aiosqlite:///{tmp_path}/flux.db")


@pytest.mark.postgres
async def test_postgresql_commits_rule_state_with_the_batch(pg_url: str) -> None:
    await _round_trip(pg_url)


async def _purges(url: str) -> None:
    config = DatabaseConfig(url=url)
    await upgrade_async(config)
    engine = create_engine(config)
    kept = StateRow("ring", "script", "a", "fp", {"n": 1}, 1)
    changed = StateRow("ring", "script", "b", "old-fp", {"n": 2}, 1)
    gone = StateRow("deleted-rule", "script", "a", "fp", {"n": 3}, 1)
    packed = StateRow("", "windows", "a", "", {"deleted-rule": {"fingerprint": "f", "value": {}}})
    try:
        async with engine.begin() as conn:
            await write_rule_state(conn, [kept, changed, gone, packed])
        # A load with errors: the rule missing now may only have a typo; its rows wait.
        assert await purge_stale(engine, {"ring": "fp"}, drop_absent=False) == 1
        assert {(row.rule_id, row.key) for row in await load_rule_state(engine)} == {
            ("ring", "a"),
            ("deleted-rule", "a"),
            ("", "a"),
        }
        assert await purge_stale(engine, {"ring": "fp"}) == 1  # a clean load: gone goes
        rows = sorted(await load_rule_state(engine), key=lambda row: row.rule_id)
        assert rows == [packed, kept]
    finally:
        await engine.dispose()


async def test_sqlite_drops_stale_state_and_keeps_a_missing_rules_after_a_bad_load(
    tmp_path: Path,
) -> None:
    await _purges(f"sqlite+aiosqlite:///{tmp_path}/flux.db")


@pytest.mark.postgres
async def test_postgresql_drops_stale_state_and_keeps_a_missing_rules_after_a_bad_load(
    pg_url: str,
) -> None:
    await _purges(pg_url)
