"""SQLite gives the pages retention frees back to the file system

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

``auto_vacuum = INCREMENTAL`` lets ``PRAGMA incremental_vacuum`` shrink the file after a
purge. SQLite applies a new auto_vacuum mode to an existing file only through ``VACUUM``,
which rewrites the whole file once: it needs free disk space about the size of the database
and takes a while on a large one (``flux db upgrade`` chooses the moment; otherwise the
first ``flux run`` of this version does it). PostgreSQL has nothing to change.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _set_auto_vacuum(mode: str) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # VACUUM cannot run inside a transaction.
    with op.get_context().autocommit_block():
        op.execute(f"PRAGMA auto_vacuum = {mode}")
        op.execute("VACUUM")


def upgrade() -> None:
    _set_auto_vacuum("INCREMENTAL")


def downgrade() -> None:
    _set_auto_vacuum("NONE")
