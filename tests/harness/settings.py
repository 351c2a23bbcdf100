"""A gateway's settings for one test: its own topics, client id, database file and ports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flux.config import Settings
from tests.harness.waiting import unique


def make_settings(
    tmp_path: Path,
    broker: tuple[str, int],
    *,
    device_ids: list[str] | None = None,
    database_url: str | None = None,
    **sections: dict[str, Any],
) -> Settings:
    """Settings for one test: its own topics, client id, database file and ports."""
    host, port = broker
    topics = [f"devices/{device}/#" for device in device_ids or [unique("dev")]]
    data: dict[str, Any] = {
        "server": {"port": 0},
        "metrics": {"port": 0},
        "mqtt": {
            "url": f"mqtt://{host}:{port}",
            "client_id": unique("flux-test-"),
            "topics": topics,
            "session_expiry_s": 120,
            "embedded": "off",
            "embedded_data_dir": str(tmp_path / "broker"),
        },
        "database": {"url": database_url or f"sqlite+aiosqlite:///{tmp_path}/flux.db"},
        "rules": {"dir": str(tmp_path / "rules")},
        "plugins": {"dir": str(tmp_path / "plugins")},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Settings.model_validate(data)
