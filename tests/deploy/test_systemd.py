"""The systemd unit in ``deploy/systemd``: valid for systemd itself, sandboxed, and its
overrides valid for flux."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flux.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "flux.service"
INSTALLED_FLUX = "/opt/flux/bin/flux"
#: ``systemd-analyze security`` exposure, times ten, the unit must stay within ("OK").
MAX_EXPOSURE = 20


def directives(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, values in order (keys repeat)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture
def unit_here(tmp_path: Path) -> Path:
    """The unit with ``ExecStart`` pointing at this environment's ``flux`` (systemd checks
    that the program exists), else as shipped."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt install systemd)")
    flux = Path(sys.executable).parent / "flux"
    assert flux.is_file(), flux
    text = UNIT.read_text()
    start = f"ExecStart={INSTALLED_FLUX} "
    assert text.count(start) == 1
    copy = tmp_path / "flux.service"
    copy.write_text(text.replace(start, f"ExecStart={flux} "))
    return copy


def test_systemd_analyze_verifies_the_unit_without_a_word(unit_here: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit_here)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on unknown keys and bad values too, only printing them.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_sandbox_keeps_its_exposure_level(unit_here: Path) -> None:
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            f"--threshold={MAX_EXPOSURE}",
            str(unit_here),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_the_unit_restarts_writes_only_its_state_and_lets_wasmtime_compile() -> None:
    unit = directives(UNIT.read_text())
    assert unit["ExecStart"] == [f"{INSTALLED_FLUX} run --config /etc/flux/config.toml"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["StateDirectory"] == ["flux"]
    assert unit["WorkingDirectory"] == unit["ReadWritePaths"] == ["/var/lib/flux"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["NoNewPrivileges"] == ["yes"]
    # wasmtime writes machine code into memory it then executes.
    assert "MemoryDenyWriteExecute" not in unit
    # SIGTERM to flux alone: it drains, then stops its embedded broker itself.
    assert unit["KillMode"] == ["mixed"]


def test_the_units_overrides_are_valid_settings(tmp_path: Path) -> None:
    environment = dict(
        value.partition("=")[::2] for value in directives(UNIT.read_text())["Environment"]
    )
    settings = load_settings(ROOT / "config.toml", environ=environment)
    assert settings.rules.dir == "/etc/flux/rules"
    assert settings.plugins.dir == "/etc/flux/plugins"
    assert settings.plugins.cache_dir.startswith("/var/lib/flux/")
