"""Rule tracing over HTTP and from the command line, on a served gateway's live traffic."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from flux.cli import main
from tests.api.test_report import TOKEN, Served, post_events, served, settings_for, write_rules
from tests.harness import wait_until

RULES = """
[[rules]]
id = "hot"
topic = "devices/+/telemetry"
when = "temperature > 30"
actions = [{ type = "alert" }]
"""


async def test_a_trace_returns_the_next_live_evaluations(
    tmp_path: Path, broker: tuple[str, int], serve_gateway: Served
) -> None:
    write_rules(tmp_path, RULES)
    async with served(serve_gateway, settings_for(tmp_path, broker)) as (gateway, client, _url):
        unknown = await client.post("/api/v1/rules/nope/trace", json={})
        too_many = await client.post("/api/v1/rules/hot/trace", json={"count": 1001})
        trace = asyncio.create_task(
            client.post("/api/v1/rules/hot/trace", json={"count": 4, "timeout_s": 30})
        )
        await wait_until(lambda: gateway.rules.tracing, timeout=10)
        device = await post_events(client, 2, temperature=31)
        await post_events(client, 2, temperature=20)
        response = await trace
        quiet = await client.post("/api/v1/rules/hot/trace", json={"count": 1, "timeout_s": 0.2})

    assert unknown.status_code == 404 and unknown.json()["rule_id"] == "nope"
    assert too_many.status_code == 422
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["complete"] is True and len(body["evaluations"]) == 4
    results = [r["result"] for r in body["evaluations"]]
    assert results == ["matched", "matched", "not_matched", "not_matched"]
    first = body["evaluations"][0]["input"]
    assert first["device_id"] == device and first["payload"]["temperature"] == 31
    assert quiet.status_code == 200 and quiet.json()["complete"] is False


async def test_flux_rules_trace_prints_each_evaluation(
    tmp_path: Path,
    broker: tuple[str, int],
    serve_gateway: Served,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_rules(tmp_path, RULES)
    async with served(serve_gateway, settings_for(tmp_path, broker)) as (gateway, client, url):
        argv = ["rules", "trace", "hot", "--count", "2", "--url", url, "--token", TOKEN]
        as_text = asyncio.create_task(asyncio.to_thread(main, argv))
        await wait_until(lambda: gateway.rules.tracing, timeout=10)
        await post_events(client, 2, temperature=35)
        assert await as_text == 0
        text = capsys.readouterr().out
        as_json = asyncio.create_task(asyncio.to_thread(main, [*argv, "--json"]))
        await wait_until(lambda: gateway.rules.tracing, timeout=10)
        await post_events(client, 2, temperature=10)
        assert await as_json == 0
        trace = orjson.loads(capsys.readouterr().out)

    lines = text.splitlines()
    assert len(lines) == 2 and all(" matched " in line for line in lines)
    assert '"temperature":35' in lines[0] and "devices/" in lines[0]
    assert [r["result"] for r in trace["evaluations"]] == ["not_matched", "not_matched"]
