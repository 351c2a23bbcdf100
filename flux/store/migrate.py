"""Apply Alembic migrations from code: on start-up and through ``flux db upgrade``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

from flux.config import DatabaseConfig
from flux.store.database import sqlite_path


def migrations_dir() -> Path:
    """Find the migrations: inside the installed package, else the source checkout's folder."""
    package_copy = Path(__file__).resolve().parent.parent / "_migrations"
    if package_copy.is_dir():
        return package_copy
    return Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(config: DatabaseConfig, revision: str = "head") -> None:
    """Upgrade the database to ``revision``; blocking (Alembic runs its own event loop)."""
    if config.is_sqlite:
        path = sqlite_path(config.url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(config.url), revision)


def downgrade(config: DatabaseConfig, revision: str) -> None:
    """Downgrade the database to ``revision``; blocking."""
    command.downgrade(alembic_config(config.url), revision)


async def upgrade_async(config: DatabaseConfig) -> None:
    """Upgrade in a worker thread, since Alembic's environment starts its own loop."""
    await asyncio.to_thread(upgrade, config)


__all__ = ["alembic_config", "downgrade", "migrations_dir", "upgrade", "upgrade_async"]
