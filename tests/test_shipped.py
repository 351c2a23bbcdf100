"""The shipped configuration, rules and plugins outside the checkout: ``flux init`` from an
installed wheel, ``flux run`` there, and the warning when a folder is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from flux.errors import FluxError
from flux.shipped import init, shipped_files
from tests.harness import PrivateMosquitto, free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]


def _env(**overrides: str) -> dict[str, str]:
    """This environment without FLUX_* overrides or a PYTHONPATH reaching the checkout."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FLUX_") and key not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    return {**env, **overrides}


def _run(*command: str | Path, cwd: Path, timeout: float = 120) -> str:
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{command}: {result.stdout}\n{result.stderr}"
    return result.stdout


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    mine = tmp_path / "rules" / "climate.toml"
    mine.write_text("# my own rules\n")
    with pytest.raises(FluxError, match=r"climate\.toml"):
        init(tmp_path)
    assert mine.read_text() == "# my own rules\n"
    assert not (tmp_path / "config.toml").exists()  # nothing written at all
    written = init(tmp_path, force=True)
    assert mine.read_text() == (ROOT / "rules" / "climate.toml").read_text()
    assert sorted(path.relative_to(tmp_path) for path in written) == sorted(shipped_files())


async def test_flux_run_warns_naming_the_setting_of_a_missing_folder(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[server]\nport = {free_port()}\n[mqtt]\nembedded = "off"\n'
        f'url = "mqtt://127.0.0.1:{free_port()}"\n'
        f'[database]\nurl = "sqlite+aiosqlite:///{tmp_path}/flux.db"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "flux", "run", "--config", str(config)],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        lines: list[str] = []
        while len([line for line in lines if " WARNING " in line and ".dir: " in line]) < 2:
            line = process.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    warned = "".join(lines)
    assert f"rules.dir: {tmp_path / 'rules'} is not a directory" in warned
    assert f"plugins.dir: {tmp_path / 'plugins'} is not a directory" in warned


@pytest.mark.slow
async def test_a_wheel_installed_in_a_new_virtualenv_inits_runs_and_stores(
    tmp_path: Path, mosquitto: PrivateMosquitto
) -> None:
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", "dist", ROOT, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("flux_gateway-*.whl")
    _run(sys.executable, "-m", "venv", "venv", cwd=tmp_path)
    _run(tmp_path / "venv/bin/pip", "install", "-q", wheel, cwd=tmp_path, timeout=300)
    site = tmp_path / "site"
    site.mkdir()
    flux = tmp_path / "venv/bin/flux"
    where = _run(tmp_path / "venv/bin/python", "-c", "import flux; print(flux.__file__)", cwd=site)
    assert Path(where.strip()).is_relative_to(tmp_path / "venv"), where  # not the checkout
    _run(flux, "init", cwd=site)
    assert (site / "config.toml").read_bytes() == (ROOT / "config.toml").read_bytes()
    assert sorted((site / "rules").glob("*.toml")) and sorted((site / "plugins").glob("*/*.wasm"))

    port = free_port()
    dev = f"dev-{uuid.uuid4().hex[:8]}"
    env = _env(
        FLUX_SERVER__PORT=str(port),
        FLUX_MQTT__URL=f'"mqtt://127.0.0.1:{mosquitto.port}"',
        FLUX_MQTT__EMBEDDED='"off"',
        FLUX_MQTT__CLIENT_ID=f'"flux-{dev}"',
        FLUX_PLUGINS__CACHE_DIR=str(tmp_path / "modules"),
    )
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(flux), "run"], cwd=site, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as api:

            async def ready() -> bool:
                assert process.poll() is None, log_path.read_text()
                try:
                    return (await api.get("/ready")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_until(ready, timeout=60, what="the installed gateway ready")
            # The wheel's own modules run, with the shipped rules and plugins from `flux init`.
            assert (await api.get("/api/v1/status")).status_code == 200
            plugins = (await api.get("/api/v1/plugins")).json()
            assert {p["name"] for p in plugins["plugins"]} == {
                "batch-stats",
                "enrich",
                "frame-decoder",
            }, plugins
            rules = (await api.get("/api/v1/rules")).json()["rules"]
            assert "overheat" in {rule["id"] for rule in rules}

            device = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{dev}-device")
            device.connect("127.0.0.1", mosquitto.port)
            device.loop_start()
            device.publish(
                f"devices/{dev}/telemetry", b'{"temperature": 31.5, "humidity": 40}', qos=1
            ).wait_for_publish(10)
            device.disconnect()
            device.loop_stop()

            async def stored() -> bool:
                response = await api.get(f"/api/v1/devices/{dev}/events")
                return response.status_code == 200 and any(
                    event["payload"] == {"temperature": 31.5, "humidity": 40}
                    for event in response.json()
                )

            await wait_until(stored, what="the message read back through the API")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert "is not a directory" not in log_path.read_text()
    assert (site / "data" / "flux.db").is_file()
