"""Rule state that outlives a process: the rows that carry it to and from the database.

Three kinds of state belong to a rule: a script rule's per-device ``state`` table, a window
rule's open windows per group, and the rule's quarantine. Each travels as ``StateRow``s:
the engine hands out the rows a batch changed, they ride on the store's transaction with
that batch's alerts, and at start (or on a device's first message) they are read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

StateKind = Literal["script", "window", "quarantine"]


@dataclass(frozen=True, slots=True)
class StateRow:
    """One rule's state for one key (a device id, a window group, or ``""``).

    ``fingerprint`` names what the state depends on (the rule's condition, script or
    window); state whose fingerprint no longer matches its rule is dropped on load.
    ``value`` is JSON-able; ``None`` deletes the row.
    """

    rule_id: str
    kind: StateKind
    key: str
    fingerprint: str
    value: dict[str, Any] | None


__all__ = ["StateKind", "StateRow"]
