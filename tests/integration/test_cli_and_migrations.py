"""The command line and the migrations, on real SQLite files and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
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
from tests.harness import device, free_port, unique, wait_until


def _flux(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "flux", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env=env,
    )


def test_help_explains_every_command() -> None:
    result = _flux("--help")
    assert result.returncode == 0
    for command in ("run", "db", "config", "rules", "plugins"):
        assert command in result.stdout
    assert "upgrade" in _flux("db", "--help").stdout
    assert "--config" in _flux("run", "--help").stdout


ROOT = Path(__file__).resolve().parents[2]


def test_rules_validate_reports_each_broken_rule_with_its_line(tmp_path: Path) -> None:
    assert _flux("rules", "validate", str(ROOT / "rules")).returncode == 0
    (tmp_path / "bad.toml").write_text(
        '[[rules]]\nid = "ok"\ntopic = "a/#"\nwhen = "x > 1"\n\n'
        '[[rules]]\nid = "broken"\ntopic = "a/#"\nscript = """\nlocal a = 1\nreturn a +\n"""\n'
    )
    result = _flux("rules", "validate", str(tmp_path))
    assert result.returncode == 1
    report = orjson.loads(result.stdout)
    assert report["valid"] == ["ok"]
    [error] = report["errors"]
    assert error["rule_id"] == "broken" and error["error"] == "RuleCompileError"
    assert error["line"] == 3


def test_rules_test_and_plugins_test_from_the_command_line() -> None:
    matched = _flux(
        "rules",
        "test",
        "overheat",
        "--path",
        str(ROOT / "rules"),
        "--payload",
        '{"temperature": 31, "humidity": 40}',
    )
    assert matched.returncode == 0, matched.stderr
    assert orjson.loads(matched.stdout)["matched"] is True
    bad = _flux("rules", "test", "overheat", "--path", str(ROOT / "rules"), "--payload", "[1]")
    assert bad.returncode == 1 and "JSON object" in bad.stderr
    decoded = _flux(
        "plugins",
        "test",
        "frame-decoder",
        "--path",
        str(ROOT / "plugins"),
        "--hex",
        "010d1e2d0bc400",
    )
    assert decoded.returncode == 0, decoded.stderr
    [output] = orjson.loads(decoded.stdout)
    assert output["payload"]["temperature"] == 33.58


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f"[database]\nurl = 'sqlite+aiosqlite:///{tmp_path}/cli.db'\n")
    result = _flux("db", "upgrade", "--config", str(config))
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


@pytest.mark.slow
async def test_flux_run_starts_the_embedded_broker_stores_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    """`flux run` with nothing on the broker port: embedded broker, a stored message, exit 0."""
    mqtt_port, http_port = free_port(), free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f"[server]\nport = {http_port}\n[metrics]\nport = 0\n"
        f"[mqtt]\nurl = 'mqtt://127.0.0.1:{mqtt_port}'\nembedded_data_dir = '{tmp_path}/broker'\n"
        f"[database]\nurl = 'sqlite+aiosqlite:///{tmp_path}/flux.db'\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "flux", "run", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(ready, timeout=60, what="gateway ready")
            dev = unique("dev")
            with device("127.0.0.1", mqtt_port) as sim:
                sim.publish_all(
                    [
                        (
                            f"devices/{dev}/telemetry",
                            orjson.dumps({"temperature": 31.5, "humidity": 40}),
                        )
                    ]
                )

            async def stored() -> bool:
                response = await client.get(f"/api/v1/devices/{dev}/events")
                return response.status_code == 200 and len(response.json()) == 1

            await wait_until(stored, timeout=30, what="message stored")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output.decode()
    assert b"flux stopped" in output


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


def test_run_against_an_unreachable_database_says_so_in_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FLUX_DATABASE__URL": f"postgresql+asyncpg://127.0.0.1:{free_port()}/nowhere",
        "FLUX_MQTT__EMBEDDED": "off",
        "FLUX_SERVER__PORT": "0",
        "FLUX_METRICS__PORT": "0",
    }
    result = _flux("run", cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "flux: cannot migrate the database at postgresql+asyncpg://127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr
