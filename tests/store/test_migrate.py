"""The migrations, on real SQLite files and a real PostgreSQL: upgrade, round trips, start-up."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect

from flux.config import DatabaseConfig
from flux.store.database import create_engine
from flux.store.migrate import (
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    upgrade,
    upgrade_async,
)
from flux.store.schema import metadata
from tests.harness import flux_command


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f"[database]\nurl = 'sqlite+aiosqlite:///{tmp_path}/cli.db'\n")
    result = flux_command("db", "upgrade", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cli.db").exists()


def _schema_diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def _check_round_trip(url: str) -> None:
    config = DatabaseConfig(url=url)
    await asyncio.to_thread(upgrade, config)
    engine = create_engine(config)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_schema_diff) == [], "models and migrations disagree"
            expected = {"devices", "events", "alerts", "rules", "dead_letters", "plugins"}
            assert expected <= await conn.run_sync(_tables)
        await asyncio.to_thread(downgrade, config, "base")
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == {"alembic_version"}
        await asyncio.to_thread(upgrade, config)
        async with engine.connect() as conn:
            assert await conn.run_sync(_schema_diff) == []
    finally:
        await engine.dispose()


async def test_migrations_round_trip_on_sqlite(tmp_path: Path) -> None:
    await _check_round_trip(f"sqlite+aiosqlite:///{tmp_path}/m.db")


@pytest.mark.postgres
async def test_migrations_round_trip_on_postgresql(pg_url: str) -> None:
    await _check_round_trip(pg_url)


async def test_start_up_migrates_once_and_skips_alembic_at_head(tmp_path: Path) -> None:
    config = DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/flux.db")
    assert await current_revision(config) is None
    await upgrade_async(config)
    alembic_head = ScriptDirectory.from_config(alembic_config(config.url)).get_current_head()
    assert await current_revision(config) == head_revision() == alembic_head
    # A later start finds the head and never loads Alembic (~11 MiB of RSS).
    probe = (
        "import asyncio, sys\n"
        "from flux.config import DatabaseConfig\n"
        "from flux.store.migrate import upgrade_async\n"
        f"asyncio.run(upgrade_async(DatabaseConfig(url={config.url!r})))\n"
        "print('alembic' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"
