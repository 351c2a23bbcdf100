"""The live dashboard page at ``/`` in a real headless Chromium, against ``flux run``.

The page opens with the API token in its URL fragment, draws its charts from the history
the gateway sampled, and the charts and tables change as real MQTT messages arrive; the
browser logs no console error. Without a token it asks for one. The screenshot is kept in
``test-artifacts/dashboard.png`` (its path is printed).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.harness import (
    FleetDevice,
    GatewayProcess,
    Upstream,
    device,
    require_tool,
    unique,
    write_config,
)

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
TOKEN = "d4shboard"
#: What Chromium needs to run headless on a CI machine with no display and no network.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1500",
)


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with a fresh profile, its console log kept."""
    options = Options()
    options.binary_location = require_tool("chromium", install="chromium")
    for argument in (*CHROMIUM_ARGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(require_tool("chromedriver", install="chromium-driver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def chart(driver: webdriver.Chrome, name: str) -> dict[str, Any]:
    """What a chart drew: how many points, its largest value, each series' last value."""
    svg = driver.find_element(By.ID, f"chart-{name}")
    return {
        "points": int(svg.get_attribute("data-points") or 0),
        "max": float(svg.get_attribute("data-max") or 0),
        "last": json.loads(svg.get_attribute("data-last") or "{}"),
    }


def text(driver: webdriver.Chrome, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def wait_for(driver: webdriver.Chrome, what: str, condition: Any, timeout: float = 30) -> None:
    WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: condition(d), message=f"the page never showed {what}"
    )


def console_errors(driver: webdriver.Chrome) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


async def test_the_dashboard_charts_live_traffic_in_chromium(
    tmp_path: Path,
    broker: tuple[str, int],
    chromium: webdriver.Chrome,
    upstream: Upstream,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dev = unique("dev")
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    shutil.copytree(REPO / "plugins", tmp_path / "plugins", ignore=shutil.ignore_patterns("*.md"))
    config = write_config(
        tmp_path,
        mqtt_port=broker[1],
        dev=dev,
        server={"api_token": TOKEN},
        metrics={"sample_interval_s": 0.5, "history_s": 120.0},
        **{"sinks.cloud": upstream.sink(topics=[f"devices/{dev}/#"])},
    )
    gateway = GatewayProcess(config)
    gateway.start()
    try:
        await gateway.wait_ready()
        driver = chromium
        driver.get(f"{gateway.base_url}/#token={TOKEN}")
        wait_for(driver, "a chart with history", lambda d: chart(d, "events")["points"] >= 2)
        wait_for(driver, "the shipped rules", lambda d: "overheat" in text(d, "rules"))
        assert "token" not in driver.current_url  # taken out of the address bar
        assert chart(driver, "events")["max"] == 0
        assert chart(driver, "matches")["last"] == {}
        plugins = text(driver, "plugins")
        assert "enrich" in plugins and "batch-stats" in plugins

        hot = FleetDevice(0, seed=1, first_ts=time.time() - 300, interval_s=1)
        with device(*broker) as sensor:
            for _ in range(300):
                sensor.publish(f"devices/{dev}/telemetry", orjson.dumps(hot.reading()))
            sensor.publish(f"devices/{dev}/telemetry", b"{broken", qos=1).wait_for_publish()

            wait_for(driver, "events per second", lambda d: chart(d, "events")["max"] > 0)
            wait_for(driver, "a latency", lambda d: chart(d, "latency")["max"] > 0)
            wait_for(driver, "matches", lambda d: "overheat" in chart(d, "matches")["last"])
            wait_for(driver, "a dead letter", lambda d: chart(d, "dead")["max"] > 0)
            wait_for(
                driver,
                "the dead letter's reason",
                lambda d: "invalid_json" in text(d, "dead-letters"),
            )
        wait_for(driver, "the sink's rows sent", lambda d: "cloud" in text(d, "sinks"))
        sinks = text(driver, "sinks")
        assert "local" in sinks and "webhooks" in sinks
        # A paused sink keeps its rows: the table shows its state and its backlog.
        paused = httpx.post(
            f"{gateway.base_url}/api/v1/sinks/cloud/pause",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert paused.status_code == 200, paused.text
        with device(*broker) as sensor:
            for _ in range(20):
                reading = orjson.dumps(hot.reading())
                sensor.publish(f"devices/{dev}/telemetry", reading, qos=1).wait_for_publish()
        def paused_with_backlog(d: webdriver.Chrome) -> bool:
            row = next(r for r in text(d, "sinks").splitlines() if r.startswith("cloud"))
            cells = row.split()
            return cells[2] == "paused" and int(cells[3]) >= 20

        wait_for(driver, "the paused sink and its backlog", paused_with_backlog)
        bus = chart(driver, "bus")
        assert set(bus["last"]) == {"store", "pipeline", "capacity"}
        assert bus["last"]["capacity"] == 1024
        assert "overheat" in text(driver, "alerts")

        screenshot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(screenshot))
        ARTIFACTS.mkdir(exist_ok=True)
        kept = ARTIFACTS / "dashboard.png"
        shutil.copyfile(screenshot, kept)
        with capsys.disabled():
            print(f"\ndashboard screenshot: {kept}")
        assert console_errors(driver) == []

        # Without a token (a new tab has none) the page asks for it, then shows the gateway.
        driver.execute_script("sessionStorage.clear()")
        driver.get(f"{gateway.base_url}/")
        wait_for(driver, "the token form", lambda d: d.find_element(By.ID, "login").is_displayed())
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "#login button").click()
        wait_for(driver, "the charts after login", lambda d: chart(d, "events")["points"] >= 1)
        refused = console_errors(driver)
        assert refused and all("401" in message for message in refused)
    finally:
        gateway.kill()
