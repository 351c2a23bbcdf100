"""Scenario 7: ``flux run`` with an invalid configuration stops before any connection opens.

Every variant starts from a valid file whose MQTT broker is a socket this test listens on
and whose SQLite file lives in the variant's folder, then breaks one key (or sets a bad
``FLUX_*`` override). Pass: exit code 2, the key path named on stderr, no connection ever
reached the listening socket, no database file created.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import clean_env, free_port, write_config

EXIT_CONFIG = 2

# (name, section, key, bad value as TOML, key path the error must name)
VARIANTS: list[tuple[str, str, str, str, str]] = [
    ("capacity zero", "eventbus", "capacity", "0", "eventbus.capacity"),
    ("unknown policy", "eventbus", "overflow", "'drop_everything'", "eventbus.overflow"),
    ("http broker url", "mqtt", "url", "'http://broker'", "mqtt.url"),
    ("url without host", "mqtt", "url", "'mqtt://'", "mqtt.url"),
    ("qos 2", "mqtt", "qos", "2", "mqtt.qos"),
    ("no topics", "mqtt", "topics", "[]", "mqtt.topics"),
    ("bad filter", "mqtt", "topics", "['a/#/b']", "mqtt.topics"),
    ("payload limit zero", "mqtt", "max_payload_bytes", "0", "mqtt.max_payload_bytes"),
    ("keepalive too short", "mqtt", "keepalive_s", "1", "mqtt.keepalive_s"),
    ("topics not a list", "mqtt", "topics", "42", "mqtt.topics"),
    ("port out of range", "server", "port", "70000", "server.port"),
    ("timeout zero", "server", "request_timeout_s", "0", "server.request_timeout_s"),
    ("typo in a key", "server", "prot", "8080", "server.prot"),
    ("mysql url", "database", "url", "'mysql://db/flux'", "database.url"),
    ("batch zero", "database", "batch_size", "0", "database.batch_size"),
    ("flush not a number", "database", "flush_interval_ms", "'fast'", "database.flush_interval_ms"),
    ("synchronous off", "database", "sqlite_synchronous", "'OFF'", "database.sqlite_synchronous"),
    ("negative drain", "shutdown", "drain_timeout_s", "-1", "shutdown.drain_timeout_s"),
    ("pool zero", "plugins", "pool_size", "0", "plugins.pool_size"),
    ("unknown section", "nonsense", "x", "1", "nonsense"),
    ("open API without a token", "server", "host", "'0.0.0.0'", "server.api_token"),
    ("token file missing", "server", "api_token_file", "'absent-token'", "server.api_token_file"),
    ("certificate without key", "server", "tls_cert_file", "'config.toml'", "server.tls_key_file"),
    ("unknown sink type", "sinks.cloud", "type", "'kafka'", "sinks.cloud"),
]

# (name, environment override, key path)
ENV_VARIANTS = [
    ("env capacity not a number", {"FLUX_EVENTBUS__CAPACITY": "lots"}, "eventbus.capacity"),
    ("env unknown key", {"FLUX_MQTT__HOSTNAME": "x"}, "mqtt.hostname"),
]


def _base_config(directory: Path, mqtt_port: int) -> Path:
    return write_config(directory, mqtt_port=mqtt_port, dev="cfg")


def _break(config: Path, section: str, key: str, value: str) -> None:
    """Set ``section.key`` to the TOML text ``value`` (replacing it, or adding the section)."""
    kept: list[str] = []
    current = ""
    for line in config.read_text().splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        if current == section and line.startswith(f"{key} = "):
            continue
        kept.append(line)
    header = f"[{section}]"
    if header in kept:
        kept.insert(kept.index(header) + 1, f"{key} = {value}")
    else:
        kept += [header, f"{key} = {value}"]
    config.write_text("\n".join(kept) + "\n")


@pytest.mark.slow
def test_invalid_configs_exit_naming_the_key_before_connecting(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen(16)
        listener.setblocking(False)
        mqtt_port = listener.getsockname()[1]

        runs: list[tuple[str, str, Path, subprocess.Popen[str]]] = []
        for index, (name, section, key, value, path) in enumerate(VARIANTS):
            directory = tmp_path / f"v{index}"
            directory.mkdir()
            config = _base_config(directory, mqtt_port)
            _break(config, section, key, value)
            runs.append((name, path, directory, _flux_run(config, clean_env())))
        for index, (name, environ, path) in enumerate(ENV_VARIANTS):
            directory = tmp_path / f"e{index}"
            directory.mkdir()
            config = _base_config(directory, mqtt_port)
            runs.append((name, path, directory, _flux_run(config, clean_env(**environ))))

        failures = []
        for name, path, directory, process in runs:
            _, stderr = process.communicate(timeout=90)
            if process.returncode != EXIT_CONFIG:
                failures.append(f"{name}: exit {process.returncode}, stderr {stderr[-500:]!r}")
            elif path not in stderr:
                failures.append(f"{name}: stderr does not name {path!r}: {stderr[-500:]!r}")
            if (directory / "flux.db").exists():
                failures.append(f"{name}: the database file was created")
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            connection = None
        if connection is not None:
            connection.close()
            failures.append("a gateway connected to the MQTT broker despite an invalid config")
    print(f"\n[invalid config] {len(runs)} variants, {len(failures)} failures")
    assert not failures, "\n".join(failures)


def _flux_run(config: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flux", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=config.parent,
    )


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["server.port", "metrics.port"])
def test_a_port_in_use_is_one_line_naming_the_setting(tmp_path: Path, setting: str) -> None:
    """A taken port stops ``flux run`` with exit code 2 and one line, before it connects."""
    section, key = setting.split(".")
    with socket.socket() as taken, socket.socket() as broker:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        broker.bind(("127.0.0.1", 0))
        broker.listen(16)
        broker.setblocking(False)
        config = _base_config(tmp_path, broker.getsockname()[1])
        _break(config, section, key, str(taken.getsockname()[1]))
        process = _flux_run(config, clean_env())
        _, stderr = process.communicate(timeout=90)
        with pytest.raises(BlockingIOError):
            broker.accept()  # nothing connected to the broker
    lines = stderr.strip().splitlines()
    assert process.returncode == EXIT_CONFIG, stderr
    assert len(lines) == 1 and lines[0].startswith(f"flux: {setting}: cannot listen on"), stderr
    assert "in use" in lines[0], stderr


# (name, TOML appended to a valid file, key path the error must name)
SINK_VARIANTS = [
    ("mqtt sink with an http url", '[sinks.up]\ntype = "mqtt"\nurl = "http://x"\n', "sinks.up.url"),
    ("http sink with an ftp url", '[sinks.h]\ntype = "http"\nurl = "ftp://x/in"\n', "sinks.h.url"),
    (
        "unknown template field",
        '[sinks.up]\ntype = "mqtt"\nurl = "mqtt://x"\ntopic = "a/{nope}"\n',
        "sinks.up.topic",
    ),
    ("a built-in name", '[sinks.local]\ntype = "mqtt"\nurl = "mqtt://x"\n', "sinks"),
]

FORWARD_NOWHERE = """
[[rules]]
id = "fwd"
topic = "devices/+/telemetry"
when = "true"
actions = [ { type = "forward", sink = "nowhere" } ]
"""


@pytest.mark.slow
def test_bad_sinks_and_forwards_to_no_sink_exit_naming_the_key(tmp_path: Path) -> None:
    """A broken ``[sinks.*]`` section, or a rule forwarding to a sink that is not
    configured, stops start-up with exit code 2 and the key, before MQTT connects."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen(16)
        listener.setblocking(False)
        mqtt_port = listener.getsockname()[1]
        runs = []
        for index, (name, extra, path) in enumerate(SINK_VARIANTS):
            directory = tmp_path / f"s{index}"
            directory.mkdir()
            config = _base_config(directory, mqtt_port)
            config.write_text(config.read_text() + extra)
            runs.append((name, path, _flux_run(config, clean_env())))
        directory = tmp_path / "forward"
        directory.mkdir()
        config = _base_config(directory, mqtt_port)
        (directory / "rules" / "fwd.toml").write_text(FORWARD_NOWHERE)
        runs.append(
            ("forward to no sink", "rules.fwd.forward[0].sink", _flux_run(config, clean_env()))
        )
        failures = []
        for name, path, process in runs:
            _, stderr = process.communicate(timeout=90)
            if process.returncode != EXIT_CONFIG or path not in stderr:
                failures.append(f"{name}: exit {process.returncode}, stderr {stderr[-500:]!r}")
        with pytest.raises(BlockingIOError):
            listener.accept()  # no gateway reached MQTT
    assert not failures, "\n".join(failures)
