"""Rule state that outlives a process: the rows that carry it to and from the database.

Three kinds of state belong to a rule: a script rule's per-device ``state`` table, a window
rule's open windows per group, and the rule's quarantine. Each travels as ``StateRow``s:
the engine hands out the rows a batch changed, they ride on the store's transaction with
that batch's alerts, and at start (or on a device's first message) they are read back.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

if TYPE_CHECKING:
    from flux.rules.model import Rule

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


def fingerprint(rule: Rule) -> str:
    """What a rule's state depends on: its kind and Lua source (condition or script), not
    its actions, topic or description. A window rule's open windows depend on its window,
    ``group_by``, ``select`` and ``time_field``, not on its ``when``: a new threshold keeps
    the aggregates gathered so far."""
    if rule.window is not None:
        text = orjson.dumps(
            {
                "window": rule.window.model_dump(mode="json"),
                "group_by": rule.group_by,
                "select": rule.select,
                "time_field": rule.time_field,
            },
            option=orjson.OPT_SORT_KEYS,
        )
        return "w" + hashlib.sha256(text).hexdigest()[:15]
    return rule.compile_key[2]


def state_params(
    rows: Sequence[StateRow], stamp: Callable[[float], Any]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """``rows`` as the drivers' parameters: (rule id, kind, key, fingerprint, JSON text,
    updated at) to upsert, (rule id, kind, key) to delete; the last change of a key wins."""
    latest = {(row.rule_id, row.kind, row.key): row for row in rows}
    now = stamp(time.time())
    upserts = [
        (row.rule_id, row.kind, row.key, row.fingerprint, orjson.dumps(row.value).decode(), now)
        for row in latest.values()
        if row.value is not None
    ]
    deletes = [key for key, row in latest.items() if row.value is None]
    return upserts, deletes


__all__ = ["StateKind", "StateRow", "fingerprint", "state_params"]
