"""Named fault-injection points for the fault suite: off unless ``FLUX_FAULT`` names one.

``FLUX_FAULT=after_commit:3`` kills the process with SIGKILL the 3rd time the code passes
``hit("after_commit")`` (``after_commit`` alone means the 1st time; several points may be
armed, comma-separated). The variable is read once, at import: when it is unset ``hit`` is a
function that returns at once, so the hooks cost nothing in production.
"""

from __future__ import annotations

import os
import signal

#: Points the store writer passes: inside the transaction after the inserts, right after
#: the commit (before any acknowledgement), and after each acknowledgement of a batch.
POINTS = ("before_commit", "after_commit", "mid_ack")


def _parse(spec: str) -> dict[str, int]:
    """Map each armed point to the pass that fires it; ignore blanks, reject nonsense."""
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
    """Count a pass through ``point``; on the armed pass, die as a power cut would."""
    target = _ARMED.get(point)
    if target is None:
        return
    _passes[point] += 1
    if _passes[point] == target:
        os.kill(os.getpid(), signal.SIGKILL)


hit = _armed if _ARMED else _off
"""``hit(point)``: pass the fault point ``point`` (kills the process when it is armed)."""

__all__ = ["POINTS", "hit"]
