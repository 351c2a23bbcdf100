"""windows (W1): the drain of P1 with 10 stateless rules against 10 window rules, 100 devices.

Three rounds, alternating, each a fresh broker and database: the same fleet backlog
(drifting sensors, ``--messages`` over 100 devices) through ``enrich`` and either the
bench's 10 generated threshold rules or 10 generated window rules (a minute per device,
``avg``/``max``/``count``, a ``when`` like the thresholds'). The last row is the ratio of
the medians: window rules' events/s over the stateless rules'.
"""

from __future__ import annotations

import statistics
from functools import partial
from pathlib import Path
from typing import Any

from scripts.bench.bench import Bench, Run
from scripts.bench.drain import drain_backlog
from scripts.bench.load import publish_fleet

DEVICES = 100
ROUNDS = 3
RULES = 10


def window_rules_dir(bench: Bench, count: int = RULES) -> Path:
    """Write ``count`` window rules that match now and then: a minute per device."""
    folder = bench.workdir / "window-rules"
    folder.mkdir(exist_ok=True)
    lines = []
    for i in range(count):
        lines += [
            "[[rules]]",
            f'id = "bench-window-{i}"',
            'topic = "devices/+/telemetry"',
            'window = { type = "tumbling", size_s = 60 }',
            'select = { avg_t = "avg(temperature)", max_h = "max(humidity)", n = "count()" }',
            f'when = "avg_t > {30 + i % 5} and max_h < {60 - i % 7} and n >= 3"',
            'actions = [{ type = "alert", severity = "info" }]',
            "",
        ]
    (folder / "bench.toml").write_text("\n".join(lines))
    return folder


def scenario_windows(bench: Bench, run: Run) -> list[dict[str, Any]]:
    args = bench.args
    assert bench.db is not None
    per_device = max(1, args.messages // DEVICES)
    total = per_device * DEVICES
    folders = {"stateless": bench.rules_dir(), "window": window_rules_dir(bench)}
    rows: list[dict[str, Any]] = []
    rates: dict[str, list[float]] = {kind: [] for kind in folders}
    for round_ in range(1, ROUNDS + 1):
        for kind, folder in folders.items():
            broker = bench.new_broker()
            bench.db.reset()
            config = bench.config(args.workers, rules={"dir": str(folder)})
            preload = partial(publish_fleet, broker.port, DEVICES, per_device, args.publishers)
            row = drain_backlog(bench, run, config, total, preload)
            rates[kind].append(row["events_per_s"])
            rows.append({"rules": kind, "round": round_, "devices": DEVICES, **row})
            print(f"   round {round_} {kind}: {row['events_per_s']} events/s", flush=True)
    stateless = statistics.median(rates["stateless"])
    window = statistics.median(rates["window"])
    rows.append(
        {
            "rules": "window/stateless",
            "stateless_events_per_s": stateless,
            "window_events_per_s": window,
            "ratio": round(window / stateless, 3),
        }
    )
    return rows
