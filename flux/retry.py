"""Capped exponential backoff with jitter: the one every retry loop of the gateway uses.

Each delay is drawn between half the current step and the whole of it (so it never exceeds
the cap); the step doubles from ``first_s`` to ``max_s`` and goes back to ``first_s`` on
``reset``. Jitter keeps the workers and gateways that lost the same database or broker at
the same moment from all coming back at the same moment.
"""

from __future__ import annotations

import random

#: The first wait after a failed database operation (it doubles up to a configured cap).
DB_RETRY_FIRST_S = 0.05


def jittered(delay_s: float) -> float:
    """``delay_s`` drawn between half of itself and itself."""
    return delay_s * (0.5 + random.random() / 2)


def exponential_delay(attempt: int, *, first_s: float, max_s: float) -> float:
    """The jittered delay before retry number ``attempt`` (1 for the first retry)."""
    return jittered(min(max_s, first_s * 2.0 ** min(max(attempt - 1, 0), 60)))


class Backoff:
    """The delays of one retry loop: ``next()`` after each failure, ``reset()`` after a
    success."""

    __slots__ = ("first_s", "max_s", "step_s")

    def __init__(self, *, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max(max_s, first_s)
        #: The current step before jitter (0 until the first failure).
        self.step_s = 0.0

    def next(self) -> float:
        """The delay before the next try; the step doubles for the one after."""
        self.step_s = self.first_s if not self.step_s else min(self.step_s * 2, self.max_s)
        return jittered(self.step_s)

    def reset(self) -> None:
        """Start again from ``first_s`` (the last try worked)."""
        self.step_s = 0.0


__all__ = ["DB_RETRY_FIRST_S", "Backoff", "exponential_delay", "jittered"]
