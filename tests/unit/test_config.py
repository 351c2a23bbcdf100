from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flux.config import Settings, load_settings
from flux.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


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
