"""Rule state that outlives a process: the rows that carry it to and from the database.

Three kinds of state belong to a rule: a script rule's per-device ``state`` table, a window
rule's open windows per group, and the rule's quarantine. Each travels as ``StateRow``s:
the engine hands out the rows a batch changed, they ride on the store's transaction with
that batch's alerts, and at start (or on a device's first message) they are read back.

Window rows are stored packed: one ``windows`` row per group key holding the open windows
of every window rule for that key (``pack_windows``), so a batch writes one row per group
it touched rather than one per rule and group. They are encoded as they are handed out
(an ``orjson.Fragment``): the windows keep changing while the rows wait for their commit,
and encoding once is cheaper than copying them first.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

if TYPE_CHECKING:
    from flux.rules.model import Rule

StateKind = Literal["script", "window", "windows", "quarantine"]


@dataclass(frozen=True, slots=True)
class StateRow:
    """One rule's state for one key (a device id, a window group, or ``""``).

    ``fingerprint`` names what the state depends on (the rule's condition, script or
    window); state whose fingerprint no longer matches its rule is dropped on load.
    ``value`` is JSON-able (a script's table: ``state_value``; a packed window row's JSON,
    already encoded); ``None`` deletes the row.
    ``version`` goes up with every write of a key (0: not counted), so an instance can tell
    that another one wrote the key since it last read or wrote it.
    """

    rule_id: str
    kind: StateKind
    key: str
    fingerprint: str
    value: dict[str, Any] | list[Any] | orjson.Fragment | None
    version: int = 0


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


def state_value(items: Iterable[tuple[Any, Any]]) -> dict[str, Any] | list[Any]:
    """A script's ``state`` table as a JSON value: an object when every key is a string
    (the usual case), else a list of ``[key, value]`` pairs (``state[1] = ...``: JSON
    objects have string keys only)."""
    pairs = list(items)
    if all(isinstance(key, str) for key, _ in pairs):
        return dict(pairs)
    return [[key, value] for key, value in pairs]


def state_entries(value: dict[str, Any] | list[Any]) -> dict[Any, Any]:
    """The entries ``state_value`` stored, for a Lua table."""
    if isinstance(value, dict):
        return value
    return {key: item for key, item in value}


def state_params(
    rows: Sequence[StateRow], stamp: Callable[[float], Any]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """``rows`` as the drivers' parameters: (rule id, kind, key, fingerprint, JSON text,
    version, updated at) to upsert, (rule id, kind, key) to delete; the last change of a key
    wins."""
    latest = {(row.rule_id, row.kind, row.key): row for row in rows}
    now = stamp(time.time())
    upserts = [
        (
            row.rule_id,
            row.kind,
            row.key,
            row.fingerprint,
            orjson.dumps(row.value).decode(),
            row.version,
            now,
        )
        for row in latest.values()
        if row.value is not None
    ]
    deletes = [key for key, row in latest.items() if row.value is None]
    return upserts, deletes


#: The ``rule_id`` of packed window rows (no rule has an empty id).
PACKED = ""


def pack_windows(
    keys: Iterable[str], parts: Callable[[str], dict[str, dict[str, Any]]]
) -> list[StateRow]:
    """One ``windows`` row per group key in ``keys``, holding every window rule's open
    windows for that key as ``parts(key)`` gives them (rule id -> fingerprint and value),
    encoded now; ``None`` once no rule has one."""
    packed = []
    for key in keys:
        rules = parts(key)
        value = orjson.Fragment(orjson.dumps(rules)) if rules else None
        packed.append(StateRow(PACKED, "windows", key, "", value))
    return packed


def unpack_windows(rows: Sequence[StateRow]) -> list[StateRow]:
    """The per-rule ``window`` rows inside packed ``windows`` rows (others pass through)."""
    unpacked: list[StateRow] = []
    for row in rows:
        if row.kind != "windows":
            unpacked.append(row)
            continue
        packed = row.value if isinstance(row.value, dict) else {}
        for rule_id, entry in packed.items():
            if isinstance(entry, dict):
                value = entry.get("value")
                unpacked.append(
                    StateRow(rule_id, "window", row.key, str(entry.get("fingerprint")), value)
                )
    return unpacked


__all__ = [
    "PACKED",
    "StateKind",
    "StateRow",
    "fingerprint",
    "pack_windows",
    "state_entries",
    "state_params",
    "state_value",
    "unpack_windows",
]
