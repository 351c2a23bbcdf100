"""Apply Alembic migrations from code: on start-up and through ``flux db upgrade``.

Alembic is imported only when the database is behind: once loaded it stays in the gateway's
memory for its lifetime, and a database at the head revision (every start but the first)
needs nothing from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from flux.config import DatabaseConfig
from flux.errors import StoreUnavailable
from flux.shipped import packaged
from flux.store.database import create_engine, sqlite_path

if TYPE_CHECKING:
    from alembic.config import Config

#: How long a gateway whose migration failed waits for another one migrating the same
#: database at the same moment (two hosts started together on a new database).
CONCURRENT_MIGRATION_S = 30.0
_REVISION = re.compile(r"^(down_)?revision\b[^=]*=\s*['\"]?([\w-]+|None)", re.MULTILINE)


def migrations_dir() -> Path:
    """Find the migrations: inside the installed package, else the source checkout's folder."""
    return packaged("_migrations", "migrations")


def head_revision() -> str:
    """The newest revision in the migrations folder (the one no other revision follows)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in migrations_dir().glob("versions/*.py"):
        for down, value in _REVISION.findall(script.read_text()):
            (parents if down else revisions).add(value)
    heads = revisions - parents
    if len(heads) != 1:
        raise RuntimeError(f"migrations have {len(heads)} heads, expected one: {sorted(heads)}")
    return heads.pop()


def alembic_config(url: str) -> Config:
    from alembic.config import Config

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
    from alembic import command

    command.upgrade(alembic_config(config.url), revision)


def downgrade(config: DatabaseConfig, revision: str) -> None:
    """Downgrade the database to ``revision``; blocking."""
    from alembic import command

    command.downgrade(alembic_config(config.url), revision)


async def current_revision(config: DatabaseConfig) -> str | None:
    """The revision the database is at, or None (no database yet, or never migrated)."""
    engine = create_engine(config)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    except DBAPIError:
        return None
    finally:
        await engine.dispose()


def upgrade_in_child(config: DatabaseConfig) -> None:
    """Upgrade to head in a short-lived child process, so this one never loads Alembic."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        pool.submit(upgrade, config).result()


async def upgrade_async(config: DatabaseConfig, *, in_child: bool = False) -> None:
    """Upgrade to head unless already there. Alembic runs in a worker thread (its
    environment starts its own event loop), or with ``in_child`` in a child process: what
    ``flux run`` does, so a first start costs no more memory than any later one."""
    try:
        if await current_revision(config) == head_revision():
            return
        try:
            await asyncio.to_thread(upgrade_in_child if in_child else upgrade, config)
        except Exception:
            # Another gateway sharing the database may be migrating it at the same moment
            # (both found it behind): wait for it to reach head before giving up.
            if not await _reaches_head(config):
                raise
    except Exception as exc:  # unreachable, refused, broken: the gateway cannot start
        where = make_url(config.url).render_as_string(hide_password=True)
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise StoreUnavailable(
            f"cannot migrate the database at {where}: {type(exc).__name__}: {detail}"
        ) from exc


async def _reaches_head(config: DatabaseConfig) -> bool:
    """Whether the database reaches the head revision within ``CONCURRENT_MIGRATION_S``."""
    deadline = time.monotonic() + CONCURRENT_MIGRATION_S
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await current_revision(config) == head_revision():
                return True
        await asyncio.sleep(0.25)
    return False


__all__ = [
    "alembic_config",
    "current_revision",
    "downgrade",
    "head_revision",
    "migrations_dir",
    "upgrade",
    "upgrade_async",
    "upgrade_in_child",
]
