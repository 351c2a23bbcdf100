"""What a run reports: versions, the table, bench-results.json, the plot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from contextlib import suppress
from importlib import metadata
from pathlib import Path
from typing import Any

from scripts.bench.bench import Bench
from scripts.bench.database import redact
from scripts.bench.processes import cpu_model
from scripts.bench.sampling import Series


def _rates(points: list[tuple[float, float]], window: float = 0.5) -> tuple[list[float], ...]:
    """Events/s from cumulative counts, over a trailing window of ``window`` s.

    The first points, before half a window has passed, are left out: one batch commit over
    a single 50 ms sample would read as a spike.
    """
    xs: list[float] = []
    ys: list[float] = []
    j = 0
    for i in range(1, len(points)):
        t, count = points[i]
        while j < i - 1 and points[j + 1][0] <= t - window:
            j += 1
        t0, count0 = points[j]
        if t - t0 >= window / 2:
            xs.append(t)
            ys.append((count - count0) / (t - t0))
    return xs, ys


def plot(series: list[Series], path: str, title: str) -> bool:
    """Draw committed events/s and per-message latency over time into ``path`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("--plot needs matplotlib (pip install -e '.[dev]'); no plot written")
        return False
    counts = [s for s in series if s.kind == "count" and len(s.points) > 1]
    latencies = [s for s in series if s.kind == "latency" and s.points]
    panels = int(bool(counts)) + int(bool(latencies))
    if not panels:
        print("--plot: nothing to draw")
        return False
    fig, axes = plt.subplots(panels, 1, figsize=(11, 4 * panels), squeeze=False)
    column = list(axes[:, 0])
    if counts:
        ax = column.pop(0)
        for s in counts:
            xs, ys = _rates(s.points)
            (line,) = ax.plot(xs, ys, label=s.label, linewidth=1.2)
            for mark in s.marks:
                ax.axvline(mark, color=line.get_color(), linestyle="--", linewidth=0.8)
        heading = "events committed per second (0.5 s trailing window)"
        if any(s.marks for s in counts):
            heading += "; dashed: the flood's publishers are done"
        ax.set_title(heading)
        ax.set_xlabel("seconds since the gateway was ready (workers: since the flood began)")
        ax.set_ylabel("events/s")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    if latencies:
        ax = column.pop(0)
        for s in latencies:
            xs = [p[0] for p in s.points]
            ys = [p[1] for p in s.points]
            ax.plot(xs, ys, ".", markersize=1.5, label=f"{s.label} ({len(ys)} messages)")
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_title("publish -> visible in the database, per message")
        ax.set_xlabel("send time (s since the stream began)")
        ax.set_ylabel("latency (ms, log)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper right", fontsize="small", markerscale=6)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def versions() -> dict[str, str]:
    names = [
        "flux-gateway",
        "gmqtt",
        "sqlalchemy",
        "aiosqlite",
        "asyncpg",
        "fastapi",
        "uvicorn",
        "orjson",
        "paho-mqtt",
        "lupa",
        "wasmtime",
        "uvloop",
    ]
    found = {"python": platform.python_version()}
    for name in names:
        with suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False)
    found["mosquitto"] = mosquitto.stdout.splitlines()[0] if mosquitto.stdout else "?"
    return found


def write_report(bench: Bench, results: list[dict[str, Any]], *, loadavg: float) -> None:
    """Print the table, write ``--output`` (machine, versions, settings, results) and the plot."""
    args = bench.args
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_1m_at_start": round(loadavg, 2),
    }
    report = {
        "machine": machine,
        "versions": versions(),
        "settings": {**vars(args), "database_url": redact(args.database_url)},
        "results": results,
    }
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nmachine: {machine['cpu']}, {machine['cores']} cores, load {loadavg:.2f}")
    for result in results:
        print(" | ".join(f"{key}={value}" for key, value in result.items()))
    print(f"results written to {args.output}")
    if args.plot:
        title = f"flux bench: {machine['cpu']}, {machine['cores']} cores, {time.strftime('%F %R')}"
        if plot(bench.series, args.plot, title):
            print(f"plot written to {args.plot}")
