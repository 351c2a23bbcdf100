"""What rides on the store's next event batch: alert rows, outbox rows, rule state and outbox
deletions.

The pipeline queues the rows its actions produce (an alert, a publish, a webhook, a
forward), each group with the hook to call once it is committed; the sinks queue the ids
of rows their receivers confirmed. The next event batch takes them all into its own
transaction, so they cost no commit (and no fsync) of their own; when no batch follows, the
writer commits them alone after a short idle time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flux.rules.state import StateRow
from flux.sinks.rows import OutboxRow


@dataclass(slots=True)
class Riders:
    """Rows and deletions waiting for a transaction, and the hooks their commit calls."""

    alerts: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[OutboxRow] = field(default_factory=list)
    state: list[StateRow] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    confirms: list[Callable[[], None]] = field(default_factory=list)

    def add(
        self,
        *,
        alerts: Sequence[dict[str, Any]] = (),
        outbox: Sequence[OutboxRow] = (),
        state: Sequence[StateRow] = (),
        confirm: Callable[[], None],
    ) -> None:
        self.alerts.extend(alerts)
        self.outbox.extend(outbox)
        self.state.extend(state)
        self.confirms.append(confirm)

    @property
    def rows_waiting(self) -> bool:
        """Whether rows wait whose commit someone is waiting for (deletions alone can wait)."""
        return bool(self.confirms)

    def __bool__(self) -> bool:
        return bool(self.confirms or self.deletes)

    def confirm(self) -> None:
        """Call every hook: the rows are committed."""
        for confirm in self.confirms:
            confirm()


__all__ = ["Riders"]
