"""A few minutes of the gateway's own metrics, sampled in the process.

Every ``metrics.sample_interval_s`` the sampler reads a ``MetricsSnapshot`` and keeps the
last ``metrics.history_s`` of them, with one chart point per interval (events/s, latency,
bus depth, matches per rule, dead letters). The dashboard page shows history as soon as it
opens, and the tuning report looks at the whole window; neither computes rates from a
running total itself. A sample reads a handful of collectors: cheap next to one scrape.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Self

from flux.config import MetricsConfig
from flux.snapshot import MetricsSnapshot, Window
from flux.tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: The sources of ingested events (the bus also counts ``derived`` ones).
INGEST_SOURCES = ("mqtt", "http")


def chart_point(before: MetricsSnapshot, after: MetricsSnapshot) -> dict[str, Any]:
    """One point of the dashboard's charts: rates over the interval, gauges at its end."""
    window = Window(before, after)
    capacities = after.by("flux_eventbus_capacity", "subscriber")
    return {
        "t": round(after.at, 3),
        "seconds": round(window.seconds, 4),
        "events_in": sum(
            window.rate("flux_events_published_total", source=source) for source in INGEST_SOURCES
        ),
        "stored": window.rate("flux_db_batch_size_sum"),
        "latency_p50": window.quantile(0.5, "flux_event_commit_latency_seconds"),
        "latency_p99": window.quantile(0.99, "flux_event_commit_latency_seconds"),
        "bus_depth": after.by("flux_eventbus_depth", "subscriber"),
        "bus_capacity": max(capacities.values(), default=0),
        "matches": window.rate_by("flux_rule_matches_total", "rule"),
        "dead_letters": window.rate_by("flux_dead_letters_total", "reason"),
    }


class MetricsSampler:
    """Sample the metrics every ``interval_s`` and keep ``history_s`` of them.

    ``before_sample`` callables run on the loop before each sample, to refresh gauges that
    are read from live objects (plugin instance memory).
    """

    def __init__(
        self,
        *,
        interval_s: float,
        history_s: float,
        before_sample: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.interval_s = interval_s
        self.history_s = history_s
        self._before_sample = tuple(before_sample)
        size = round(history_s / interval_s) + 1
        self._snapshots: deque[MetricsSnapshot] = deque(maxlen=size)
        self._points: deque[dict[str, Any]] = deque(maxlen=size)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(
        cls, config: MetricsConfig, *, before_sample: Sequence[Callable[[], None]] = ()
    ) -> MetricsSampler:
        return cls(
            interval_s=config.sample_interval_s,
            history_s=config.history_s,
            before_sample=before_sample,
        )

    async def __aenter__(self) -> Self:
        if self._task is not None:
            raise RuntimeError("the metrics sampler is already running")
        self.sample()
        self._task = asyncio.create_task(self._run(), name="metrics sampler")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.sample()
            except Exception:
                log.exception("sampling the metrics failed; the next sample tries again")

    def snapshot(self) -> MetricsSnapshot:
        """Read the metrics now (refreshing the live gauges first)."""
        for refresh in self._before_sample:
            refresh()
        return MetricsSnapshot.take()

    def sample(self) -> None:
        """Take one sample and its chart point."""
        snapshot = self.snapshot()
        if self._snapshots:
            self._points.append(chart_point(self._snapshots[-1], snapshot))
        self._snapshots.append(snapshot)

    def points(self, since: float | None = None) -> list[dict[str, Any]]:
        """The chart points, oldest first; only those after ``since`` (UNIX time) if given."""
        if since is None:
            return list(self._points)
        return [point for point in self._points if point["t"] > since]

    def history(self) -> list[MetricsSnapshot]:
        """The snapshots kept, oldest first."""
        return list(self._snapshots)

    def window(self) -> tuple[Window, list[MetricsSnapshot]]:
        """From the oldest snapshot kept to now, and every snapshot in between."""
        now = self.snapshot()
        kept = [*self._snapshots, now]
        return Window(kept[0], now), kept


__all__ = ["INGEST_SOURCES", "MetricsSampler", "chart_point"]
