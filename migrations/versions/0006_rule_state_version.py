"""rule state versions: which instance's copy of a device's state is the newer one

``rule_state.version`` goes up with every write of a key, so an instance that took a
device's messages before can tell that another one wrote its state since (a device whose
messages move back and forth between instances). The ``(kind, key)`` index serves reading
the state of a batch's devices.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rule_state", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("version", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.create_index("ix_rule_state_kind_key", ["kind", "key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("rule_state", schema=None) as batch_op:
        batch_op.drop_index("ix_rule_state_kind_key")
        batch_op.drop_column("version")
