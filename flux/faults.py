"""Named fault-injection points for the fault suite: off unless ``FLUX_FAULT`` names one.

``FLUX_FAULT=after_commit:3`` kills the process with SIGKILL the 3rd time the code passes
``hit("after_commit")`` (``after_commit`` alone means the 1st time; several points may be
armed, comma-separated). ``FLUX_FAULT=db_io_error:5`` instead makes the first 5 passes of
``hit("db_io_error")`` raise the ``OperationalError("disk I/O error")`` SQLAlchemy raises for
a failing disk, inside the write transaction: an outage of 5 refused commits.
``FLUX_FAULT=disk_full:5`` raises SQLite's "database or disk is full" the same way, at every
write the gateway makes (event batches, alerts, dead letters, the webhook outbox, retention's
deletes). The variable is read once, at import: when it is unset ``hit`` is a function that
returns at once, so the hooks cost nothing in production. In-process tests may ``arm`` and
``disarm`` points.
"""

from __future__ import annotations

import os
import signal

#: Points the store writer passes: inside the transaction after the inserts, right after
#: the commit (before any acknowledgement), and after each acknowledgement of a batch; and
#: the rule publisher's, right after it wrote publishes (before their PUBACKs come back).
KILL_POINTS = ("before_commit", "after_commit", "mid_ack", "publish_written")
#: Points that raise a database error instead, with the message SQLite gives.
ERROR_MESSAGES = {"db_io_error": "disk I/O error", "disk_full": "database or disk is full"}
ERROR_POINTS = tuple(ERROR_MESSAGES)
POINTS = KILL_POINTS + ERROR_POINTS


def _parse(spec: str) -> dict[str, int]:
    """Map each armed point to its pass count; ignore blanks, reject nonsense."""
    armed: dict[str, int] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        point, _, nth = item.partition(":")
        if point not in POINTS:
            raise ValueError(f"FLUX_FAULT names an unknown fault point {point!r}; use {POINTS}")
        count = int(nth) if nth else 1
        if count < 1:
            raise ValueError(f"FLUX_FAULT: the pass count of {point!r} must be at least 1")
        armed[point] = count
    return armed


_ARMED = _parse(os.environ.get("FLUX_FAULT", ""))
_passes: dict[str, int] = dict.fromkeys(_ARMED, 0)


def _off(point: str) -> None:
    """Do nothing: no fault point is armed in this process."""


def _armed(point: str) -> None:
    """Count a pass through ``point``; kill the process or raise as it is armed to."""
    target = _ARMED.get(point)
    if target is None:
        return
    _passes[point] += 1
    if point in ERROR_POINTS:
        if _passes[point] <= target:
            _raise_database_error(ERROR_MESSAGES[point])
    elif _passes[point] == target:
        os.kill(os.getpid(), signal.SIGKILL)


def _raise_database_error(message: str) -> None:
    import sqlite3

    from sqlalchemy.exc import OperationalError

    raise OperationalError("COMMIT", None, sqlite3.OperationalError(message))


def arm(spec: str) -> None:
    """Arm points as ``FLUX_FAULT`` would (``""`` disarms all), with fresh pass counts."""
    global hit
    _ARMED.clear()
    _ARMED.update(_parse(spec))
    _passes.clear()
    _passes.update(dict.fromkeys(_ARMED, 0))
    hit = _armed if _ARMED else _off


def disarm() -> None:
    """Disarm every point."""
    arm("")


hit = _armed if _ARMED else _off
"""``hit(point)``: pass the fault point ``point`` (kills or raises when it is armed)."""

__all__ = ["ERROR_POINTS", "KILL_POINTS", "POINTS", "arm", "disarm", "hit"]
