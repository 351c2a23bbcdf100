"""one outbox for every sink (webhooks, rule publishes, upstream brokers and HTTP ingests)

The webhook outbox's rows move into ``outbox`` as rows of the built-in sink ``webhooks``,
keeping their attempts and schedule; ``webhook_outbox`` is dropped.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _row_ids(count: int) -> list[str]:
    """Sortable ids in the format of event ids (milliseconds, a random prefix, a counter)."""
    millis = int(time.time() * 1000)
    prefix = int.from_bytes(os.urandom(4), "big")
    return [f"{millis:012x}{prefix:08x}{n:012x}" for n in range(count)]


def upgrade() -> None:
    outbox = op.create_table(
        "outbox",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("sink", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=255), nullable=True),
        sa.Column("event_id", sa.String(length=32), nullable=True),
        sa.Column("rule_id", sa.String(length=64), nullable=True),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("headers", _JSON, nullable=True),
        sa.Column("timeout_s", sa.Float(), nullable=True),
        sa.Column("qos", sa.Integer(), server_default="1", nullable=False),
        sa.Column("retain", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("hops", sa.Integer(), server_default="0", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claim_token", sa.String(length=32), nullable=True),
        sa.Column("last_error", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )
    op.create_index("ix_outbox_sink_id", "outbox", ["sink", "id"], unique=False)
    op.create_index(
        "ix_outbox_sink_next_attempt_at", "outbox", ["sink", "next_attempt_at"], unique=False
    )
    op.create_table(
        "sink_leases",
        sa.Column("sink", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sink", name=op.f("pk_sink_leases")),
    )
    bind = op.get_bind()
    old = sa.table(
        "webhook_outbox",
        *(
            sa.column(name)
            for name in (
                "id", "rule_id", "event_id", "url", "headers", "body", "timeout_s", "attempts",
                "next_attempt_at", "last_error", "created_at",
            )
        ),
    )
    rows = bind.execute(sa.select(old).order_by(old.c.id)).mappings().all()
    if rows:
        op.bulk_insert(
            outbox,
            [
                {
                    "id": row_id,
                    "sink": "webhooks",
                    "rule_id": row["rule_id"],
                    "event_id": row["event_id"],
                    "topic": row["url"],
                    "payload": row["body"],
                    "headers": row["headers"],
                    "timeout_s": row["timeout_s"],
                    "attempts": row["attempts"],
                    "next_attempt_at": row["next_attempt_at"],
                    "last_error": row["last_error"],
                    "created_at": row["created_at"],
                }
                for row_id, row in zip(_row_ids(len(rows)), rows, strict=True)
            ],
        )
    with op.batch_alter_table("webhook_outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_outbox_next_attempt_at")
    op.drop_table("webhook_outbox")


def downgrade() -> None:
    op.create_table(
        "webhook_outbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("rule_id", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=32), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("headers", _JSON, nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("timeout_s", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claim_token", sa.String(length=32), nullable=True),
        sa.Column("last_error", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_outbox")),
    )
    with op.batch_alter_table("webhook_outbox", schema=None) as batch_op:
        batch_op.create_index(
            "ix_webhook_outbox_next_attempt_at", ["next_attempt_at"], unique=False
        )
    op.drop_index("ix_outbox_sink_next_attempt_at", table_name="outbox")
    op.drop_index("ix_outbox_sink_id", table_name="outbox")
    op.drop_table("sink_leases")
    op.drop_table("outbox")
