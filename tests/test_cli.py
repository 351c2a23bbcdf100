"""The ``flux`` command line: its help, the rule and plugin tools, ``flux run`` end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

from tests.harness import ROOT, device, flux_command, free_port, unique, wait_until


def test_help_explains_every_command() -> None:
    result = flux_command("--help")
    assert result.returncode == 0
    for command in ("run", "db", "config", "rules", "plugins"):
        assert command in result.stdout
    assert "upgrade" in flux_command("db", "--help").stdout
    assert "--config" in flux_command("run", "--help").stdout


def test_rules_validate_reports_each_broken_rule_with_its_line(tmp_path: Path) -> None:
    assert flux_command("rules", "validate", str(ROOT / "rules")).returncode == 0
    (tmp_path / "bad.toml").write_text(
        '[[rules]]\nid = "ok"\ntopic = "a/#"\nwhen = "x > 1"\n\n'
        '[[rules]]\nid = "broken"\ntopic = "a/#"\nscript = """\nlocal a = 1\nreturn a +\n"""\n'
    )
    result = flux_command("rules", "validate", str(tmp_path))
    assert result.returncode == 1
    report = orjson.loads(result.stdout)
    assert report["valid"] == ["ok"]
    [error] = report["errors"]
    assert error["rule_id"] == "broken" and error["error"] == "RuleCompileError"
    assert error["line"] == 3


def test_rules_test_and_plugins_test_from_the_command_line() -> None:
    matched = flux_command(
        "rules",
        "test",
        "overheat",
        "--path",
        str(ROOT / "rules"),
        "--payload",
        '{"temperature": 31, "humidity": 40}',
    )
    assert matched.returncode == 0, matched.stderr
    assert orjson.loads(matched.stdout)["matched"] is True
    bad = flux_command(
        "rules", "test", "overheat", "--path", str(ROOT / "rules"), "--payload", "[1]"
    )
    assert bad.returncode == 1 and "JSON object" in bad.stderr
    decoded = flux_command(
        "plugins",
        "test",
        "frame-decoder",
        "--path",
        str(ROOT / "plugins"),
        "--hex",
        "010d1e2d0bc400",
    )
    assert decoded.returncode == 0, decoded.stderr
    [output] = orjson.loads(decoded.stdout)
    assert output["payload"]["temperature"] == 33.58


@pytest.mark.slow
async def test_flux_run_starts_the_embedded_broker_stores_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    """`flux run` with nothing on the broker port: embedded broker, a stored message, exit 0."""
    mqtt_port, http_port = free_port(), free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f"[server]\nport = {http_port}\n[metrics]\nport = 0\n"
        f"[mqtt]\nurl = 'mqtt://127.0.0.1:{mqtt_port}'\nembedded_data_dir = '{tmp_path}/broker'\n"
        f"[database]\nurl = 'sqlite+aiosqlite:///{tmp_path}/flux.db'\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "flux", "run", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(ready, timeout=60, what="gateway ready")
            dev = unique("dev")
            with device("127.0.0.1", mqtt_port) as sim:
                sim.publish_all(
                    [
                        (
                            f"devices/{dev}/telemetry",
                            orjson.dumps({"temperature": 31.5, "humidity": 40}),
                        )
                    ]
                )

            async def stored() -> bool:
                response = await client.get(f"/api/v1/devices/{dev}/events")
                return response.status_code == 200 and len(response.json()) == 1

            await wait_until(stored, timeout=30, what="message stored")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output.decode()
    assert b"flux stopped" in output


def test_run_against_an_unreachable_database_says_so_in_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FLUX_DATABASE__URL": f"postgresql+asyncpg://127.0.0.1:{free_port()}/nowhere",
        "FLUX_MQTT__EMBEDDED": "off",
        "FLUX_SERVER__PORT": "0",
        "FLUX_METRICS__PORT": "0",
    }
    result = flux_command("run", cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "flux: cannot migrate the database at postgresql+asyncpg://127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr
