"""Rule state in the database (``rule_state``): read at start and on a device's first
message, written with the batches that changed it, purged when its rule changed."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, delete, or_, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from flux.rules.state import StateKind, StateRow
from flux.store.schema import rule_state

_SELECT = select(
    rule_state.c.rule_id,
    rule_state.c.kind,
    rule_state.c.key,
    rule_state.c.fingerprint,
    rule_state.c.value,
    rule_state.c.version,
)


def _row(record: Any) -> StateRow:
    return StateRow(record[0], record[1], record[2], record[3], record[4], int(record[5]))


async def load_rule_state(engine: AsyncEngine) -> list[StateRow]:
    """Every row of ``rule_state``."""
    async with engine.connect() as conn:
        return [_row(record) for record in await conn.execute(_SELECT)]


async def load_keys(engine: AsyncEngine, kind: StateKind, keys: Collection[str]) -> list[StateRow]:
    """The rows of ``kind`` for ``keys`` (a batch's devices another instance may have
    handled)."""
    query = _SELECT.where(rule_state.c.kind == kind, rule_state.c.key.in_(list(keys)))
    async with engine.connect() as conn:
        return [_row(record) for record in await conn.execute(query)]


async def write_rule_state(conn: AsyncConnection, rows: Sequence[StateRow]) -> None:
    """Upsert (``value``) or delete (``None``) ``rows`` in ``conn``'s transaction."""
    latest = {(row.rule_id, row.kind, row.key): row for row in rows}
    gone = [key for key, row in latest.items() if row.value is None]
    kept = [row for row in latest.values() if row.value is not None]
    if gone:
        columns = tuple_(rule_state.c.rule_id, rule_state.c.kind, rule_state.c.key)
        await conn.execute(delete(rule_state).where(columns.in_(gone)))
    if kept:
        insert = (
            postgresql.insert(rule_state)
            if conn.dialect.name == "postgresql"
            else sqlite.insert(rule_state)
        )
        now = datetime.now(UTC)
        statement = insert.values(
            [
                {
                    "rule_id": row.rule_id,
                    "kind": row.kind,
                    "key": row.key,
                    "fingerprint": row.fingerprint,
                    "value": row.value,
                    "version": row.version,
                    "updated_at": now,
                }
                for row in kept
            ]
        )
        await conn.execute(
            statement.on_conflict_do_update(
                index_elements=["rule_id", "kind", "key"],
                set_={
                    "fingerprint": statement.excluded.fingerprint,
                    "value": statement.excluded.value,
                    "version": statement.excluded.version,
                    "updated_at": statement.excluded.updated_at,
                },
            )
        )


async def purge_stale(
    engine: AsyncEngine, current: dict[str, str], *, drop_absent: bool = True
) -> int:
    """Delete the rows whose rule has another fingerprint now (``current``: rule id ->
    fingerprint) and, with ``drop_absent``, those whose rule is gone; return how many.

    After a load with errors pass ``drop_absent=False``: a rule missing then may only have
    a typo in its file, and its state should wait for the fix, not be wiped."""
    changed = [
        and_(rule_state.c.rule_id == rule_id, rule_state.c.fingerprint != fingerprint)
        for rule_id, fingerprint in current.items()
    ]
    if drop_absent:
        # Packed window rows hold several rules: their parts are checked as they are read.
        changed.append(
            and_(rule_state.c.rule_id.not_in(list(current)), rule_state.c.kind != "windows")
        )
    if not changed:
        return 0
    async with engine.begin() as conn:
        result = await conn.execute(delete(rule_state).where(or_(*changed)))
    return int(result.rowcount or 0)


__all__ = ["load_keys", "load_rule_state", "purge_stale", "write_rule_state"]
