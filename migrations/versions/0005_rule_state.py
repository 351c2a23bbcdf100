"""durable rule state and the ruleset version every instance watches

``rule_state`` keeps a script rule's per-device ``state``, a window rule's open windows and
a rule's quarantine across restarts; ``ruleset_version`` (one row) is bumped by every change
to the rules so every gateway sharing the database reloads.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rule_state",
        sa.Column("rule_id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("fingerprint", sa.String(32), nullable=False),
        sa.Column("value", _JSON, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
    )
    version = op.create_table(
        "ruleset_version",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("changed_at", _TIME, nullable=False),
    )
    op.bulk_insert(version, [{"id": 1, "version": 0, "changed_at": datetime.now(UTC)}])


def downgrade() -> None:
    op.drop_table("ruleset_version")
    op.drop_table("rule_state")
