"""The SQLAlchemy pool: sized from ``[database]`` and seen in the pool gauges."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from sqlalchemy import text
from sqlalchemy.exc import TimeoutError as PoolTimeout

from flux.config import DatabaseConfig
from flux.store.database import create_engine, export_pool_metrics
from tests.harness import metric_value


def pool_gauges() -> tuple[float | None, float | None]:
    """(active, idle) as /metrics shows them."""
    metrics = generate_latest().decode()
    return (
        metric_value(metrics, "flux_db_connections_active"),
        metric_value(metrics, "flux_db_connections_idle"),
    )


async def check_pool(url: str) -> None:
    config = DatabaseConfig(url=url, pool_size=2, max_overflow=1, pool_timeout_s=0.2)
    engine = create_engine(config)
    export_pool_metrics(engine)
    try:
        assert pool_gauges() == (0, 0)
        async with AsyncExitStack() as stack:
            for _ in range(3):  # pool_size + max_overflow
                connection = await stack.enter_async_context(engine.connect())
                assert (await connection.execute(text("SELECT 1"))).scalar() == 1
            assert pool_gauges() == (3, 0)
            with pytest.raises(PoolTimeout):
                await engine.connect()  # a fourth waits pool_timeout_s, then fails
        # Back in the pool: the two of pool_size stay open, the overflow one is closed.
        assert pool_gauges() == (0, 2)
    finally:
        await engine.dispose()


async def test_the_sqlite_pool_is_sized_from_the_config_and_reported(tmp_path: Path) -> None:
    await check_pool(f"sqlite+aiosqlite:///{tmp_path}/pool.db")


@pytest.mark.postgres
async def test_the_postgres_pool_is_sized_from_the_config_and_reported(pg_url: str) -> None:
    await check_pool(pg_url)


async def test_pool_recycle_s_reaches_the_pool(tmp_path: Path) -> None:
    config = DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/r.db", pool_recycle_s=0.05)
    engine = create_engine(config)
    try:
        assert engine.pool._recycle == 0.05
        default = create_engine(DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/d.db"))
        assert default.pool._recycle == -1  # 0 in the config: never
        await default.dispose()
    finally:
        await engine.dispose()
