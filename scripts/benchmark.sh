#!/usr/bin/env bash
# Load-test flux on loopback: QoS 1 backlog drain, paced publish->commit latency, HTTP ingest,
# QoS 0 live flood with 1 vs N workers; pool hit ratio and rule cost from /metrics.
# Usage: scripts/benchmark.sh [--only drain,latency,http,workers | P1..P8] [--messages N]
#        [--rate R] [--workers N] [--database-url postgresql+asyncpg://...] [--qos 0|1]
#        [--plot FILE.png] [--profile FILE] ...   (--help lists all and what P1..P8 map to)
# Uses the active virtualenv, else creates .venv and installs flux with its dev extras.
# Needs mosquitto on PATH. Bounded: every scenario stops by itself (--timeout caps each).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -d .venv ] || python3 -m venv .venv
    . .venv/bin/activate
    pip install -q -e '.[dev]'
fi
exec python -m scripts.bench "$@"
