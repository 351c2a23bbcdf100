"""The database schema as SQLAlchemy Core tables; Alembic migrations are written from it.

The schema only changes through ``migrations/``; a test checks that the migrated database
and these tables agree.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: JSON on SQLite, JSONB on PostgreSQL.
JsonType = JSON().with_variant(JSONB(), "postgresql")
Timestamp = DateTime(timezone=True)
AutoId = BigInteger().with_variant(Integer(), "sqlite")

devices = Table(
    "devices",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("first_seen", Timestamp, nullable=False),
    Column("last_seen", Timestamp, nullable=False),
    Column("message_count", BigInteger, nullable=False, server_default="0"),
    Column("last_payload", JsonType, nullable=True),
)

events = Table(
    "events",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("device_id", String(255), nullable=True),
    Column("topic", String(1024), nullable=False),
    Column("payload", JsonType, nullable=False),
    Column("received_at", Timestamp, nullable=False),
    Column("source", String(16), nullable=False),
    Column("hops", Integer, nullable=False, server_default="0"),
    Index("ix_events_device_id_received_at", "device_id", "received_at"),
    Index("ix_events_received_at", "received_at"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("topic", String(1024), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("reason", String(64), nullable=False),
    Column("detail", Text, nullable=False, server_default=""),
    Column("source", String(16), nullable=False),
    Column("received_at", Timestamp, nullable=False),
    Index("ix_dead_letters_received_at", "received_at"),
)

alerts = Table(
    "alerts",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("rule_id", String(64), nullable=False),
    Column("device_id", String(255), nullable=True),
    Column("event_id", String(32), nullable=True),
    Column("severity", String(16), nullable=False),
    Column("output", JsonType, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Index("ix_alerts_rule_id_created_at", "rule_id", "created_at"),
    Index("ix_alerts_device_id_created_at", "device_id", "created_at"),
)

rules = Table(
    "rules",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("definition", JsonType, nullable=False),
    Column("enabled", Boolean, nullable=False, server_default=true()),
    Column("version", Integer, nullable=False, server_default="1"),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

plugins = Table(
    "plugins",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("version", String(32), nullable=False),
    Column("wasm_sha256", String(64), nullable=False),
    Column("enabled", Boolean, nullable=False, server_default=true()),
    Column("settings", JsonType, nullable=True),
    Column("updated_at", Timestamp, nullable=False),
)

#: What waits for a sink: every row is committed with the batch that caused it and deleted
#: once the sink's receiver confirmed it (``flux.sinks``). ``id`` sorts by creation (an event
#: id), so a sink reads its rows in order. ``topic`` is the rendered destination: the MQTT
#: topic, or the URL of a webhook. ``next_attempt_at`` and ``claim_token`` are the webhook
#: sink's retry schedule and lease.
outbox = Table(
    "outbox",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("sink", String(64), nullable=False),
    Column("device_id", String(255), nullable=True),
    Column("event_id", String(32), nullable=True),
    Column("rule_id", String(64), nullable=True),
    Column("topic", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("headers", JsonType, nullable=True),
    Column("timeout_s", Float, nullable=True),
    Column("qos", Integer, nullable=False, server_default="1"),
    Column("retain", Boolean, nullable=False, server_default=false()),
    Column("hops", Integer, nullable=False, server_default="0"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Timestamp, nullable=True),
    Column("claim_token", String(32), nullable=True),
    Column("last_error", Text, nullable=False, server_default=""),
    Column("created_at", Timestamp, nullable=False),
    Index("ix_outbox_sink_id", "sink", "id"),
    Index("ix_outbox_sink_next_attempt_at", "sink", "next_attempt_at"),
)

#: Which gateway process sends a sink's rows (one at a time keeps them in order), until when.
sink_leases = Table(
    "sink_leases",
    metadata,
    Column("sink", String(64), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("expires_at", Timestamp, nullable=False),
)

#: Rule state that outlives a process (``flux.rules.state``): a script rule's ``state`` per
#: device, a window rule's open windows per group, a rule's quarantine. ``fingerprint`` names
#: what the state depends on; a row whose rule changed is dropped at load.
rule_state = Table(
    "rule_state",
    metadata,
    Column("rule_id", String(64), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(32), nullable=False),
    Column("value", JsonType, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

#: One row (id 1): bumped by every change to the rules (API writes, reloads), so every
#: gateway sharing the database reloads (``flux.rules.sync``).
ruleset_version = Table(
    "ruleset_version",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("changed_at", Timestamp, nullable=False),
)

__all__ = [
    "alerts",
    "dead_letters",
    "devices",
    "events",
    "metadata",
    "outbox",
    "plugins",
    "rule_state",
    "rules",
    "ruleset_version",
    "sink_leases",
]
