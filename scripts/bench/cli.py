"""The command line of ``scripts/benchmark.sh``: scenarios, ids and options."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from contextlib import ExitStack
from typing import Any

from scripts.bench.bench import ROOT, Bench, Run
from scripts.bench.database import DEFAULT_PG_URL, Database, ScratchPostgres
from scripts.bench.drain import scenario_drain
from scripts.bench.fleet import scenario_shipped, scenario_storm
from scripts.bench.forward import scenario_catchup, scenario_forward
from scripts.bench.http import scenario_http
from scripts.bench.latency import scenario_latency
from scripts.bench.report import write_report
from scripts.bench.retention import scenario_retention
from scripts.bench.windows import scenario_windows
from scripts.bench.workers import scenario_workers

#: Scenario names and the issue's ids for them; ``drain-pg`` is drain on PostgreSQL.
SCENARIO_NAMES = (
    "drain",
    "shipped",
    "storm",
    "latency",
    "http",
    "workers",
    "forward",
    "catchup",
    "retention",
    "windows",
)

IDS = {
    "P1": "drain",
    "P3": "drain",
    "P5": "drain",
    "P2": "latency",
    "P4": "http",
    "P7": "workers",
    "P8": "drain-pg",
    "S1": "shipped",
    "S2": "storm",
    "F1": "forward",
    "F2": "catchup",
    "W1": "windows",
}

SCENARIOS = {
    "drain": scenario_drain,
    "shipped": scenario_shipped,
    "storm": scenario_storm,
    "latency": scenario_latency,
    "http": scenario_http,
    "workers": scenario_workers,
    "forward": scenario_forward,
    "catchup": scenario_catchup,
    "retention": scenario_retention,
    "windows": scenario_windows,
}


def parse_only(text: str, postgres_default: bool) -> list[Run]:
    """Resolve ``--only`` names and ids into runs, in order, each run once.

    ``postgres_default`` is true when ``--database-url`` is given: then every run is on
    PostgreSQL and P8 is the same run as drain.
    """
    runs: dict[tuple[str, bool], Run] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name = IDS.get(part.upper(), part.lower())
        postgres = postgres_default or name == "drain-pg"
        name = name.removesuffix("-pg")
        if name not in SCENARIOS:
            known = ", ".join([*SCENARIO_NAMES, *IDS])
            raise ValueError(f"unknown scenario {part!r} (known: {known})")
        run = runs.setdefault((name, postgres), Run(name, postgres=postgres))
        if part.upper() in IDS:
            run.ids.append(part.upper())
    return list(runs.values())


def has_workers_flag() -> bool:
    """Whether this flux's ``run`` takes ``--workers``."""
    help_text = subprocess.run(
        [sys.executable, "-m", "flux", "run", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    ).stdout
    return "--workers" in help_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        default="drain,latency,http",
        help="comma-separated scenarios or ids: drain, shipped, storm, latency, http, workers, "
        "retention (scripts/bench_retention.py); "
        "P1/P3/P5=drain, P2=latency, P4=http, P7=workers, P8=drain on PostgreSQL, "
        "S1=shipped, S2=storm, F1=forward, F2=catchup, W1=windows (10 stateless vs 10 window "
        "rules, 3 alternating rounds) (default: drain,latency,http)",
    )
    parser.add_argument(
        "--messages", type=int, default=100_000, help="backlog (drain) or flood (workers) size"
    )
    parser.add_argument(
        "--publishers", type=int, default=4, help="publisher processes (drain, workers)"
    )
    parser.add_argument(
        "--devices", type=int, default=200, help="fleet size of the shipped and storm scenarios"
    )
    parser.add_argument(
        "--broker",
        choices=["embedded", "stock"],
        default="embedded",
        help="the private Mosquitto's configuration: flux's embedded broker's (default) or "
        "Mosquitto's defaults (max_inflight_messages 20)",
    )
    parser.add_argument("--qos", type=int, default=1, choices=[0, 1], help="drain and latency")
    parser.add_argument("--rate", type=float, default=5000, help="paced rate for latency (msg/s)")
    parser.add_argument("--duration", type=float, default=10, help="seconds of paced load")
    parser.add_argument("--http-requests", type=int, default=20_000)
    parser.add_argument("--http-concurrency", type=int, default=100)
    parser.add_argument("--capacity", type=int, default=1024, help="eventbus.capacity")
    parser.add_argument("--batch-size", type=int, default=500, help="database.batch_size")
    parser.add_argument("--rules", type=int, default=10, help="generated rules (0 = none)")
    parser.add_argument(
        "--plugin", default="enrich", help="shipped plugin to run on telemetry ('' = none)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway worker processes (flux run --workers N) for drain, latency and http; "
        "the workers scenario compares 1 with max(2, N)",
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="postgresql+asyncpg://... server to run every scenario on, in a scratch database "
        "created and dropped by the bench (default: SQLite in a temp dir)",
    )
    parser.add_argument(
        "--backlog-rows",
        type=int,
        default=1_800_000,
        help="outbox rows of the catchup scenario (one hour offline at 500 msg/s)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="cap per wait (s)")
    parser.add_argument("--output", default="bench-results.json")
    parser.add_argument(
        "--plot", default="", help="PNG of events/s and latency over time (needs matplotlib)"
    )
    parser.add_argument(
        "--profile",
        default="",
        help="py-spy collapsed stacks of each measured gateway (all workers) to this file",
    )
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    if args.database_url and not args.database_url.startswith("postgresql"):
        parser.error("--database-url takes a PostgreSQL URL (SQLite is the default)")
    if args.workers < 1 or args.publishers < 1 or args.messages < args.publishers:
        parser.error("--workers and --publishers must be >= 1, --messages >= --publishers")
    try:
        runs = parse_only(args.only, bool(args.database_url))
    except ValueError as exc:
        parser.error(str(exc))
    if shutil.which("mosquitto") is None:
        print("benchmark.sh needs mosquitto on PATH (Debian: apt-get install mosquitto)")
        return 2
    if any(run.scenario == "storm" for run in runs) and shutil.which("mosquitto_sub") is None:
        print("the storm scenario needs mosquitto_sub (Debian: apt-get install mosquitto-clients)")
        return 2
    if args.profile and shutil.which("py-spy") is None:
        print("--profile needs py-spy on PATH (pip install py-spy)")
        return 2
    skips: dict[str, str] = {}
    wants_workers = args.workers > 1 or any(run.scenario == "workers" for run in runs)
    if wants_workers and not has_workers_flag():
        if args.workers > 1:
            print("this flux's `run` has no --workers; run without --workers")
            return 2
        skips["workers"] = "this flux's `run` has no --workers yet"
    bench = Bench(args=args)
    bench.profile_each = len(runs) > 1 or any(run.scenario == "workers" for run in runs)
    sqlite_db = Database(
        f"sqlite+aiosqlite:///{bench.workdir}/bench.db", bench.workdir / "bench.db"
    )
    results: list[dict[str, Any]] = []
    failed = False
    loadavg = os.getloadavg()
    with ExitStack() as stack:
        stack.callback(bench.close_broker)
        postgres: Database | None = None
        if any(run.postgres for run in runs):
            scratch = ScratchPostgres(args.database_url or DEFAULT_PG_URL)
            reason = scratch.probe()
            if reason and args.database_url:
                print(reason)
                return 2
            if reason:
                skips["pg"] = f"P8 needs --database-url; default: {reason}"
            else:
                stack.enter_context(scratch)
                postgres = Database(scratch.url)
                print(f"PostgreSQL scratch database {scratch.name} (dropped at the end)")
        for run in runs:
            run.workers = 1 if run.scenario == "workers" else args.workers
            head: dict[str, Any] = {
                "scenario": run.scenario,
                "ids": "/".join(run.ids),
                "database": "postgresql" if run.postgres else "sqlite",
                "workers": args.workers,
            }
            print(f"-- {run.label} {head['ids']} ...", flush=True)
            reason = skips.get(run.scenario) or (skips.get("pg", "") if run.postgres else "")
            if reason:
                rows = [{"skipped": reason}]
            else:
                bench.db = postgres if run.postgres else sqlite_db
                try:
                    rows = SCENARIOS[run.scenario](bench, run)
                except Exception as exc:  # report it, keep the work dir, run the next one
                    failed = True
                    print(f"   {run.label} failed: {exc}\n   work dir kept: {bench.workdir}")
                    rows = [{"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}]
            for row in rows:
                result = {**head, **row}
                print("   " + json.dumps(result), flush=True)
                results.append(result)
    write_report(bench, results, loadavg=loadavg[0])
    if failed:
        return 1
    shutil.rmtree(bench.workdir, ignore_errors=True)
    return 0
