"""Counts sampled over time, and the percentiles of what was measured."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from scripts.bench.database import Database

#: How often the stored count is sampled (drain, http, workers) and latency throughput noted.
SAMPLE_S = 0.05

#: Flood: the count is final when it has not grown for this long after the publishers end.
SETTLE_S = 2.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Series:
    """Points for the plot: ``count`` (s, stored events) or ``latency`` (send s, latency ms)."""

    label: str
    kind: str
    points: list[tuple[float, float]] = field(default_factory=list)
    #: Times drawn as dashed lines (the end of a flood).
    marks: list[float] = field(default_factory=list)


class CountSampler:
    """Sample the stored-event count every ``SAMPLE_S`` on a thread, into a ``Series``."""

    def __init__(self, db: Database, series: Series) -> None:
        self._db = db
        self.series = series
        self.latest = 0
        self.error: Exception | None = None
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CountSampler:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        try:
            reader = self._db.reader()
            try:
                while True:
                    self.latest = reader.count()
                    now = time.perf_counter()
                    self.series.points.append((now - self.started, self.latest))
                    if self._stop.wait(SAMPLE_S):
                        return
            finally:
                reader.close()
        except Exception as exc:
            self.error = exc

    def check(self) -> None:
        """Raise what stopped the sampler, if anything did."""
        if self.error is not None:
            raise RuntimeError(f"stored-count sampler failed: {self.error!r}") from self.error

    def wait_for(self, total: int, timeout: float) -> bool:
        """Wait until ``total`` events are stored; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.latest < total:
            self.check()
            if time.monotonic() > deadline:
                return False
            time.sleep(SAMPLE_S / 2)
        return True
