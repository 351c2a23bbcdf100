from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flux.config import Settings, load_settings
from flux.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_equals_the_built_in_defaults(shipped_settings: Settings) -> None:
    assert shipped_settings == Settings()


def test_every_key_of_the_shipped_config_is_commented() -> None:
    lines = (ROOT / "config.toml").read_text().splitlines()
    for index, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            previous = [candidate for candidate in lines[:index] if candidate.strip()]
            assert previous[-1].lstrip().startswith("#") or "=" in previous[-1], line


def test_environment_overrides_parse_toml_values() -> None:
    settings = load_settings(
        None,
        environ={
            "FLUX_EVENTBUS__CAPACITY": "2048",
            "FLUX_MQTT__TOPICS": '["a/#", "b/+"]',
            "FLUX_SERVER__API_TOKEN": "s3cret",
            "FLUX_MQTT__TLS": "true",
        },
    )
    assert settings.eventbus.capacity == 2048
    assert settings.mqtt.topics == ("a/#", "b/+")
    assert settings.server.api_token == "s3cret"
    assert settings.mqtt.uses_tls


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[eventbus]\ncapacity = 0\n", "eventbus.capacity"),
        ("[eventbus]\noverflow = 'drop_everything'\n", "eventbus.overflow"),
        ("[mqtt]\nurl = 'http://x'\n", "mqtt.url"),
        ("[mqtt]\ntopics = ['a/#/b']\n", "mqtt.topics"),
        ("[database]\nurl = 'mysql://x'\n", "database.url"),
        ("[database]\nbatch_sise = 5\n", "database.batch_sise"),
        ("[database]\npool_size = 0\n", "database.pool_size"),
        ("[database]\nmax_overflow = -1\n", "database.max_overflow"),
        ("[database]\npool_timeout_s = 0\n", "database.pool_timeout_s"),
        ("[database]\npool_recycle_s = -5\n", "database.pool_recycle_s"),
        ("[metrics]\nsample_interval_s = 0\n", "metrics.sample_interval_s"),
        ("[metrics]\nsample_interval_s = 10\nhistory_s = 15\n", "metrics.history_s"),
        ("[nonsense]\nx = 1\n", "nonsense"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert caught.value.key == key


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.server.port = 1  # type: ignore[misc]


def test_flux_run_with_a_bad_config_exits_before_connecting(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    # The database lives in tmp_path: had start-up gone further it would have been created.
    path.write_text(
        f"[database]\nurl = 'sqlite+aiosqlite:///{tmp_path}/db.sqlite'\n[eventbus]\ncapacity = -5\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "flux", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "eventbus.capacity" in result.stderr
    assert not (tmp_path / "db.sqlite").exists()


def _server_error(**server: str) -> ConfigError:
    """The ConfigError of loading defaults with these [server] keys set from the environment."""
    environ = {f"FLUX_SERVER__{key.upper()}": value for key, value in server.items()}
    with pytest.raises(ConfigError) as raised:
        load_settings(None, environ=environ)
    return raised.value


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "gateway.example"])
def test_an_api_reachable_from_the_network_needs_a_token(host: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(None, environ={"FLUX_SERVER__HOST": host})
    assert raised.value.key == "server.api_token"
    assert load_settings(
        None, environ={"FLUX_SERVER__HOST": host, "FLUX_SERVER__API_TOKEN": "t"}
    ).server.api_token == "t"
    opened = load_settings(
        None, environ={"FLUX_SERVER__HOST": host, "FLUX_SERVER__ALLOW_UNAUTHENTICATED": "true"}
    )
    assert opened.server.api_token == ""


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_a_loopback_api_may_run_without_a_token(host: str) -> None:
    assert load_settings(None, environ={"FLUX_SERVER__HOST": host}).server.host == host


def test_the_token_can_come_from_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-a-secret\n")
    settings = load_settings(
        None, environ={"FLUX_SERVER__API_TOKEN_FILE": str(token_file), "FLUX_SERVER__HOST": "::"}
    )
    assert settings.server.api_token == "from-a-secret"

    error = _server_error
    missing = error(api_token_file=str(tmp_path / "absent"))
    assert missing.key == "server.api_token_file" and "absent" in missing.message
    (tmp_path / "empty").write_text("\n")
    assert error(api_token_file=str(tmp_path / "empty")).key == "server.api_token_file"
    both = error(api_token_file=str(token_file), api_token="other")
    assert both.key == "server.api_token_file" and "not both" in both.message


def test_tls_settings_are_checked_at_load(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here, only that it exists")

    def key_of(**environ: str) -> str:
        return _server_error(**environ).key

    assert key_of(tls_cert_file=str(cert)) == "server.tls_key_file"
    assert key_of(tls_cert_file=str(tmp_path / "absent")) == "server.tls_cert_file"
    assert key_of(tls_client_ca_file=str(cert)) == "server.tls_client_ca_file"
    paired = load_settings(
        None,
        environ={"FLUX_SERVER__TLS_CERT_FILE": str(cert), "FLUX_SERVER__TLS_KEY_FILE": str(cert)},
    )
    assert paired.server.uses_tls


def test_config_check_hides_secrets(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[server]\napi_token = "hunter2"\n[mqtt]\npassword = "pw-secret"\n')
    result = subprocess.run(
        [sys.executable, "-m", "flux", "config", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout and "pw-secret" not in result.stdout
    assert '"api_token": "***"' in result.stdout
