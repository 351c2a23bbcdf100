"""The tuning report and the dashboard's history on a served gateway, each condition provoked
for real: a pool of one under concurrent callers, a tiny bus behind a slow consumer, a rule
that runs into its limits, batches of one under a flood, a plugin that leaks memory."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from flux.app import Gateway
from flux.cli import main
from flux.config import Settings
from flux.plugins import PoolExhausted
from flux.plugins import pool as pool_module
from flux.tuning import format_report
from tests.harness import HookServer, free_port, make_settings, unique, wait_until
from tests.plugins.helpers import POOL_OF_ONE, echo_module, event, write_plugin

TOKEN = "r3port"

Served = Callable[[Settings], Any]


@asynccontextmanager
async def served(
    serve_gateway: Served, settings: Settings
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient, str]]:
    async with (
        serve_gateway(settings) as (gateway, server),
        httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
        ) as client,
    ):
        yield gateway, client, server.url


def settings_for(tmp_path: Path, broker: tuple[str, int], **sections: dict[str, Any]) -> Settings:
    sections.setdefault("server", {})["api_token"] = TOKEN
    return make_settings(tmp_path, broker, **sections)


def write_rules(tmp_path: Path, toml: str) -> None:
    folder = tmp_path / "rules"
    folder.mkdir(exist_ok=True)
    (folder / "test.toml").write_text(textwrap.dedent(toml), encoding="utf-8")


async def post_events(client: httpx.AsyncClient, count: int, **payload: Any) -> str:
    """POST ``count`` telemetry events of one new device in one request; return its id."""
    device = unique("dev")
    items = [
        {"topic": f"devices/{device}/telemetry", "payload": {"seq": i, **payload}}
        for i in range(count)
    ]
    response = await client.post("/api/v1/events", json=items)
    assert response.status_code == 201, response.text
    return device


async def advice(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    response = await client.get("/api/v1/report")
    assert response.status_code == 200, response.text
    return {entry["setting"]: entry for entry in response.json()["advice"]}


async def test_a_pool_of_one_under_concurrent_callers_asks_for_more_instances(
    tmp_path: Path,
    broker: tuple[str, int],
    serve_gateway: Served,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_plugin(
        tmp_path / "plugins",
        "echo",
        echo_module(),
        topics=("nothing/#",),
        manifest=POOL_OF_ONE,
    )
    settings = settings_for(tmp_path, broker)
    async with served(serve_gateway, settings) as (gateway, client, _url):

        async def burst() -> list[BaseException]:
            calls = [gateway.plugins.call("echo", event("nothing/x")) for _ in range(20)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            refused = [r for r in results if isinstance(r, BaseException)]
            assert refused and all(isinstance(r, PoolExhausted) for r in refused)
            return refused

        with caplog.at_level(logging.WARNING, logger="flux.plugins.pool"):
            first = await burst()
            named = await advice(client)
            report = (await client.get("/api/v1/report")).json()
            monkeypatch.setattr(pool_module, "EXHAUSTED_LOG_INTERVAL_S", 0.0)
            await burst()

    pool = named["plugin.echo.pool.size"]
    assert pool["current"] == 1 and pool["suggested"] == 2
    assert f"{len(first)} calls gave up after waiting 0 ms" in pool["reason"]
    assert report["stages"]["plugins"]["echo"]["exhausted"] == len(first)
    assert "eventbus.capacity" not in named
    # The first refusal is logged at once; the rest of its burst waits for the next warning.
    warnings = [r.getMessage() for r in caplog.records if "pool exhausted" in r.getMessage()]
    assert warnings[0].startswith("plugin echo: pool exhausted: 1 call(s)")
    assert warnings[1].startswith(f"plugin echo: pool exhausted: {len(first)} call(s)")


async def test_a_tiny_bus_behind_a_slow_consumer_asks_for_capacity_and_the_cli_says_so(
    tmp_path: Path,
    broker: tuple[str, int],
    serve_gateway: Served,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_rules(
        tmp_path,
        """
        [[rules]]
        id = "slow-consumer"
        topic = "devices/+/telemetry"
        script = "for i = 1, 20000 do end return false"
        actions = [{ type = "alert" }]
        """,
    )
    settings = settings_for(tmp_path, broker, eventbus={"capacity": 4})
    async with served(serve_gateway, settings) as (_gateway, client, url):
        await post_events(client, 200)
        named = await advice(client)
        argv = ["report", "--url", url, "--token", TOKEN]
        text_code = await asyncio.to_thread(main, argv)
        text = capsys.readouterr().out
        json_code = await asyncio.to_thread(main, [*argv, "--json"])
        as_json = orjson.loads(capsys.readouterr().out)
        refused = await asyncio.to_thread(main, ["report", "--url", url, "--token", "wrong"])
        refusal = capsys.readouterr().err

    capacity = named["eventbus.capacity"]
    assert capacity["current"] == 4 and capacity["suggested"] == 1000
    assert "senders waited for room" in capacity["reason"]
    assert "its queue holds 4, so its batches never fill" in capacity["reason"]
    assert text_code == 0 and "* eventbus.capacity: 4 -> 1000" in text
    assert "bus       store: " in text and "senders waited" in text
    assert json_code == 0 and as_json["stages"]["bus"]["capacity"] == 4
    assert any(sub["blocked"] for sub in as_json["stages"]["bus"]["subscribers"].values())
    assert refused == 1 and "401" in refusal


async def test_a_rule_stopped_at_its_limits_is_named(
    tmp_path: Path, broker: tuple[str, int], serve_gateway: Served
) -> None:
    write_rules(
        tmp_path,
        """
        [[rules]]
        id = "spin"
        topic = "devices/+/telemetry"
        script = "while true do end"
        actions = [{ type = "alert" }]

        [[rules]]
        id = "cheap"
        topic = "devices/+/telemetry"
        when = "seq < 0"
        actions = [{ type = "alert" }]
        """,
    )
    async with served(serve_gateway, settings_for(tmp_path, broker)) as (_gateway, client, _url):
        await post_events(client, 8)
        named = await advice(client)
        rules = (await client.get("/api/v1/report")).json()["stages"]["rules"]

    assert "rule.spin" in named and "rule.cheap" not in named
    assert named["rule.spin"]["current"].startswith("5 evaluations stopped at a limit")
    assert rules["by_rule"][0]["rule"] == "spin"
    assert rules["by_rule"][0]["errors"] == {"timeout": 5}  # then quarantined


async def test_a_rule_taking_much_of_a_core_is_named_with_its_share(
    tmp_path: Path, broker: tuple[str, int], serve_gateway: Served
) -> None:
    write_rules(
        tmp_path,
        """
        [[rules]]
        id = "heavy"
        topic = "devices/+/telemetry"
        script = "local s = 0 for i = 1, 30000 do s = s + i end return s < 0"
        actions = [{ type = "alert" }]

        [[rules]]
        id = "light"
        topic = "devices/+/telemetry"
        when = "seq < 0"
        actions = [{ type = "alert" }]
        """,
    )
    async with served(serve_gateway, settings_for(tmp_path, broker)) as (_gateway, client, _url):
        for _ in range(4):
            await post_events(client, 100)
        named = await advice(client)
        report = (await client.get("/api/v1/report")).json()

    by_rule = report["stages"]["rules"]["by_rule"]
    assert [rule["rule"] for rule in by_rule] == ["heavy", "light"]
    heavy, light = by_rule
    assert heavy["us_per_evaluation"] > 20 * light["us_per_evaluation"] > 0
    assert heavy["seconds"] > 0.9 * report["stages"]["rules"]["seconds"]
    assert "rule.heavy" in named and "rule.light" not in named
    assert "of a core" in named["rule.heavy"]["current"]
    assert "of the time all rules took" in named["rule.heavy"]["reason"]
    assert "rule      heavy: busy" in format_report(report)


async def test_sinks_behind_name_their_settings(
    tmp_path: Path, broker: tuple[str, int], serve_gateway: Served
) -> None:
    """A slow HTTP receiver taking one row per POST, and a receiver that is gone."""
    receiver = HookServer()
    receiver.delay_s = 0.02
    await receiver.start()
    sinks = {
        "slow": {"type": "http", "url": receiver.url, "topics": ["devices/#"], "batch_size": 1},
        "gone": {
            "type": "http",
            "url": f"http://127.0.0.1:{free_port()}/ingest",
            "topics": ["devices/#"],
            "retry_max_delay_s": 0.5,
        },
    }
    try:
        settings = settings_for(tmp_path, broker, sinks=sinks)
        async with served(serve_gateway, settings) as (_gateway, client, _url):
            await post_events(client, 300)
            await wait_until(lambda: len(receiver.received) >= 20, timeout=30)
            named = await advice(client)
            report = (await client.get("/api/v1/report")).json()
    finally:
        await receiver.stop()

    batch = named["sinks.slow.batch_size"]
    assert (batch["current"], batch["suggested"]) == (1, 4)
    assert "one POST of at most 1 rows at a time" in batch["reason"]
    gone = named["sinks.gone.url"]
    assert gone["current"] == sinks["gone"]["url"]
    assert "nothing was delivered in the window" in gone["reason"]
    assert "connect" in gone["reason"]
    stages = report["stages"]["sinks"]
    assert stages["slow"]["connected"] and not stages["gone"]["connected"]
    assert "sinks.local.url" not in named  # the built-in sinks get no advice


async def test_batches_of_one_under_a_flood_ask_for_a_larger_batch_size(
    tmp_path: Path, broker: tuple[str, int], serve_gateway: Served
) -> None:
    settings = settings_for(tmp_path, broker, database={"batch_size": 1}, eventbus={"capacity": 64})
    async with served(serve_gateway, settings) as (_gateway, client, _url):
        await post_events(client, 300)
        named = await advice(client)

    batch = named["database.batch_size"]
    assert batch["current"] == 1 and batch["suggested"] == 100
    assert "(100% of batch_size 1)" in batch["reason"]


async def test_a_plugin_leaking_memory_asks_to_recycle_it_sooner(
    tmp_path: Path, broker: tuple[str, int], serve_gateway: Served
) -> None:
    # The echo module's bump allocator never frees: every call grows the instance a little.
    write_plugin(
        tmp_path / "plugins",
        "leaky",
        echo_module(),
        topics=("devices/+/telemetry",),
        manifest="""
        [recycle]
        memory_high_water_bytes = 65536
        """,
    )
    async with served(serve_gateway, settings_for(tmp_path, broker)) as (_gateway, client, _url):
        await post_events(client, 1000, pad="x" * 200)
        named = await advice(client)
        plugins = (await client.get("/api/v1/report")).json()["stages"]["plugins"]

    recycle = named["plugin.leaky.recycle.after_executions"]
    recycled = plugins["leaky"]["recycles"]["memory"]
    assert recycled >= 2 and plugins["leaky"]["calls"] == 1000
    assert recycle["current"] == 10_000 and recycle["suggested"] == int(1000 / recycled * 0.8)
    assert "reached the memory mark of 65536 bytes" in recycle["reason"]


async def test_the_history_has_a_point_per_sample_with_rates_and_latency(
    tmp_path: Path, broker: tuple[str, int], serve_gateway: Served
) -> None:
    write_rules(
        tmp_path,
        """
        [[rules]]
        id = "every-reading"
        topic = "devices/+/telemetry"
        when = "seq >= 0"
        actions = [{ type = "alert" }]
        """,
    )
    settings = settings_for(tmp_path, broker, metrics={"sample_interval_s": 0.2, "history_s": 60})
    async with served(serve_gateway, settings) as (_gateway, client, _url):
        await post_events(client, 50)
        (await client.post("/api/v1/event", json={"topic": "devices/x/telemetry", "payload": {}}))

        async def points() -> list[dict[str, Any]]:
            body = (await client.get("/api/v1/history")).json()
            assert body["interval_s"] == 0.2 and body["history_s"] == 60
            return list(body["points"])

        async def saw_the_events() -> bool:
            seen = await points()
            received = sum(p["events_in"] * p["seconds"] for p in seen)
            matched = sum(p["matches"].get("every-reading", 0) * p["seconds"] for p in seen)
            return round(received) == 51 and round(matched) == 50  # {} has no seq

        await wait_until(saw_the_events, timeout=30, what="the events in the history")
        history = await points()
        newest = history[-1]["t"]
        later = (await client.get("/api/v1/history", params={"since": newest})).json()["points"]
        unauthorized = await client.get("/api/v1/history", headers={"Authorization": ""})

    busy = [p for p in history if p["events_in"]]
    assert all(p["latency_p99"] is not None and p["latency_p99"] > 0 for p in busy)
    assert all(p["stored"] >= p["events_in"] for p in busy)
    assert history[-1]["bus_capacity"] == 1024 and set(history[-1]["bus_depth"]) == {
        "store",
        "pipeline",
    }
    assert all(p["t"] > newest for p in later)
    assert unauthorized.status_code == 401
