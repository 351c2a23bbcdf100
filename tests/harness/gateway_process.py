"""``flux run`` as a child process: its config file, environment, readiness, metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

from flux.store.schema import events
from tests.harness.database import Db
from tests.harness.devices import SeqDevice
from tests.harness.waiting import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]

def write_config(
    directory: Path,
    *,
    mqtt_port: int,
    dev: str,
    database_url: str | None = None,
    http_port: int | None = None,
    **sections: dict[str, Any],
) -> Path:
    """Write a config.toml for one gateway process; return its path."""
    data: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": http_port or free_port()},
        "metrics": {"port": 0},
        "mqtt": {
            "url": f"mqtt://127.0.0.1:{mqtt_port}",
            "client_id": f"flux-fault-{uuid.uuid4().hex[:8]}",
            "topics": [f"devices/{dev}/#"],
            "session_expiry_s": 300,
            "embedded": "off",
            "embedded_data_dir": str(directory / "broker"),
            "reconnect_max_delay_s": 2.0,
        },
        "database": {"url": database_url or f"sqlite+aiosqlite:///{directory}/flux.db"},
        "rules": {"dir": str(directory / "rules")},
        "plugins": {"dir": str(directory / "plugins")},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    (directory / "rules").mkdir(exist_ok=True)
    (directory / "plugins").mkdir(exist_ok=True)
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in values.items())
        lines.append("")
    path = directory / "config.toml"
    path.write_text("\n".join(lines))
    return path

def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")

def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without FLUX_* overrides, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLUX_")}
    env.update(extra)
    return env

class GatewayProcess:
    """``python -m flux run --config ...`` as a child process, with its log in a file."""

    def __init__(
        self, config: Path, *, env: dict[str, str] | None = None, name: str = "gw"
    ) -> None:
        self.config = config
        self.env = env or clean_env()
        self.log_path = config.parent / f"{name}.log"
        self.http_port = int(tomllib.loads(config.read_text())["server"]["port"])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flux", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.config.parent,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def returncode(self) -> int | None:
        assert self.process is not None
        return self.process.poll()

    async def wait_ready(self, timeout: float = 60) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2) as client:

            async def ready() -> bool:
                if self.returncode() is not None:
                    raise AssertionError(
                        f"the gateway exited with {self.returncode()}:\n{self.log()[-3000:]}"
                    )
                try:
                    return (await client.get("/ready")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_until(ready, timeout=timeout, what="gateway /ready")

    async def wait_exit(self, timeout: float = 60) -> int:
        await wait_until(
            lambda: self.returncode() is not None, timeout=timeout, what="gateway exit"
        )
        code = self.returncode()
        assert code is not None
        return code

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        """End the process if it still runs (test clean-up)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

def metric_value(metrics_text: str, name: str, **labels: str) -> float | None:
    """Return one sample's value from Prometheus text, or None when absent."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        if metric != name:
            continue
        found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if found == wanted:
            return float(value)
    return None

async def prime_session(gateway: GatewayProcess, sim: SeqDevice, db: Db, dev: str) -> None:
    """Create the gateway's persistent session and subscription, then stop it cleanly: what
    the device publishes from now on waits in the broker for the next gateway."""
    gateway.start()
    await gateway.wait_ready()
    await wait_subscribed(sim, db, dev)
    gateway.signal(signal.SIGTERM)
    assert await gateway.wait_exit() == 0, gateway.log()[-3000:]

async def wait_subscribed(sim: SeqDevice, db: Db, dev: str, *, timeout: float = 30) -> None:
    """Publish probes on ``devices/<dev>/probe`` until one is stored: the gateway subscribed."""
    topic = f"devices/{dev}/probe"
    loop_deadline = time.monotonic() + timeout
    while True:
        sim.client.publish(topic, b'{"probe": true}', qos=1)
        try:
            await wait_until(
                lambda: _has_rows(db, topic), timeout=1.0, what="a probe message stored"
            )
            return
        except AssertionError:
            if time.monotonic() > loop_deadline:
                raise AssertionError(
                    f"the gateway did not store a probe within {timeout}s"
                ) from None

async def _has_rows(db: Db, topic: str) -> bool:
    return await db.count(events, events.c.topic == topic) > 0


def flux_command(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Any:
    """Run ``python -m flux ARGS`` to completion (2 minutes at most); the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "flux", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env=env,
    )
