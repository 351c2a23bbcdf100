#!/usr/bin/env bash
# Load-test flux on loopback: QoS 1 backlog drain, paced publish->commit latency, HTTP ingest.
# Usage: scripts/benchmark.sh [--only drain,latency,http] [--messages N] [--rate R]
#        [--database-url postgresql+asyncpg://...] [--qos 0|1] ...   (--help lists all)
# Uses the active virtualenv, else creates .venv and installs flux with its dev extras.
# Needs mosquitto on PATH. Bounded: every scenario stops by itself (--timeout caps each).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -d .venv ] || python3 -m venv .venv
    . .venv/bin/activate
    pip install -q -e '.[dev]'
fi
exec python scripts/bench.py "$@"
