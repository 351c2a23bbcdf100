"""Sinks: where the gateway sends what it stores, from one durable outbox, at least once."""

from flux.sinks.manager import LOCAL, Sinks, check_forward_sinks
from flux.sinks.rows import OutboxRow
from flux.sinks.webhooks import WEBHOOKS

__all__ = ["LOCAL", "WEBHOOKS", "OutboxRow", "Sinks", "check_forward_sinks"]
