"""A full disk loses nothing: the store stops acknowledging, /ready says ``disk_full``, and
ingest resumes by itself once space is freed.

Two ways: a really full filesystem (a small tmpfs mounted by the test, which needs root),
and ``FLUX_FAULT=disk_full:N``, SQLite's "database or disk is full" raised at every write
the gateway makes (event batches, alert rows, dead letters, the webhook outbox).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flux.store.schema import alerts, dead_letters
from tests.harness import (
    Db,
    GatewayProcess,
    HookServer,
    PrivateMosquitto,
    SeqDevice,
    clean_env,
    metric_value,
    unique,
    wait_subscribed,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow

#: The tmpfs the database lives on, and the ballast that leaves it nearly full.
FILESYSTEM_BYTES = 32 * 1024 * 1024
FREE_AFTER_BALLAST = 400 * 1024
#: Messages of about 1 KiB: several times what fits in the space left.
MESSAGES = 3000
PAD = 1000


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of a few MiB, mounted for the test (needs root; skipped elsewhere)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FILESYSTEM_BYTES}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def _ready_reasons(http: httpx.AsyncClient) -> tuple[int, list[str]]:
    response = await http.get("/ready")
    return response.status_code, response.json()["degraded"]


async def test_a_really_full_disk_stops_acknowledging_and_resumes_when_space_is_freed(
    tmp_path: Path, small_filesystem: Path, mosquitto: PrivateMosquitto
) -> None:
    dev = unique("dev")
    topic = f"devices/{dev}/telemetry"
    database_url = f"sqlite+aiosqlite:///{small_filesystem}/flux.db"
    config = write_config(
        tmp_path,
        mqtt_port=mosquitto.port,
        dev=dev,
        database_url=database_url,
        database={"retry_max_delay_s": 0.5},
    )
    gateway = GatewayProcess(config, env=clean_env())
    db = Db(database_url)
    sim = SeqDevice("127.0.0.1", mosquitto.port)
    ballast = small_filesystem / "ballast"
    try:
        gateway.start()
        await gateway.wait_ready()
        await wait_subscribed(sim, db, dev)
        free = _free_bytes(small_filesystem)
        ballast.write_bytes(b"\0" * (free - FREE_AFTER_BALLAST))
        sim.publish_seq(topic, range(MESSAGES), pad=PAD)
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:

            async def disk_full() -> bool:
                return "disk_full" in (await _ready_reasons(http))[1]

            await wait_until(disk_full, timeout=120, what="/ready reporting disk_full")
            status, reasons = await _ready_reasons(http)
            assert status == 503, reasons
            metrics = (await http.get("/metrics")).text
            assert metric_value(metrics, "flux_degraded", reason="disk_full") == 1.0
            stored_while_full = len(await db.seqs(topic))
            assert stored_while_full < MESSAGES
            assert sim.unacked() > 0, "messages were acknowledged that are stored nowhere"
            assert gateway.returncode() is None, gateway.log()[-2000:]

            ballast.unlink()
            await wait_until(lambda: db.has_all(topic, MESSAGES), timeout=120, what="all stored")
            await wait_until(sim.all_acked, timeout=60, what="every PUBACK")

            async def ready_again() -> bool:
                return (await _ready_reasons(http)) == (200, [])

            await wait_until(ready_again, timeout=30, what="/ready 200 after space was freed")
            metrics = (await http.get("/metrics")).text
            assert metric_value(metrics, "flux_degraded", reason="disk_full") == 0.0
        tally = await db.tally(topic, MESSAGES)
        print(f"\n[disk full, tmpfs] stored while full {stored_while_full}; {tally.describe()}")
        assert not tally.missing, tally.describe()
        assert "the disk holding the database is full" in gateway.log()
    finally:
        gateway.kill()
        sim.close()
        await db.close()


def _free_bytes(path: Path) -> int:
    import os

    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


RULES = """
[[rules]]
id = "every-reading"
topic = "devices/+/telemetry"
when = "seq ~= nil"
actions = [
  {{ type = "alert", severity = "info" }},
  {{ type = "webhook", url = "{url}" }},
]
"""


async def test_disk_full_at_every_write_point_loses_nothing(
    tmp_path: Path, mosquitto: PrivateMosquitto
) -> None:
    """``FLUX_FAULT=disk_full:12``: the first 12 writes, wherever they are, find the disk
    full; every event, alert, dead letter and webhook still arrives."""
    dev = unique("dev")
    topic = f"devices/{dev}/telemetry"
    hooks = HookServer()
    await hooks.start()
    config = write_config(
        tmp_path,
        mqtt_port=mosquitto.port,
        dev=dev,
        database={"retry_max_delay_s": 0.2},
        webhooks={"base_delay_s": 0.1, "max_delay_s": 0.5, "poll_interval_s": 0.1},
    )
    (tmp_path / "rules" / "rules.toml").write_text(RULES.format(url=hooks.url))
    gateway = GatewayProcess(config, env=clean_env(FLUX_FAULT="disk_full:12"))
    db = Db(f"sqlite+aiosqlite:///{tmp_path}/flux.db")
    sim = SeqDevice("127.0.0.1", mosquitto.port)
    sent, malformed = 200, 20
    try:
        gateway.start()
        await gateway.wait_ready()
        sim.publish_seq(topic, range(sent))
        for n in range(malformed):
            sim.client.publish(f"devices/{dev}/telemetry", b"not json %d" % n, qos=1)
        await wait_until(lambda: db.has_all(topic, sent), timeout=90, what="all events stored")

        async def everything_arrived() -> bool:
            return (
                await db.count(alerts) >= sent
                and await db.count(dead_letters) >= malformed
                and len({r.body for r in hooks.received}) >= sent
            )

        await wait_until(everything_arrived, timeout=90, what="alerts, dead letters, webhooks")
        await wait_until(sim.all_acked, timeout=60, what="every PUBACK")
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
            assert (await _ready_reasons(http)) == (200, [])
            metrics = (await http.get("/metrics")).text
        errors = metric_value(metrics, "flux_db_write_errors_total") or 0.0
        tally = await db.tally(topic, sent)
        print(f"\n[FLUX_FAULT=disk_full:12] {tally.describe()}; {errors:.0f} refused writes")
        assert not tally.missing, tally.describe()
        assert errors >= 1
        assert "the disk holding the database is full" in gateway.log()
    finally:
        gateway.kill()
        sim.close()
        await db.close()
        await hooks.stop()
