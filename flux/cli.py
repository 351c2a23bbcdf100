"""Command line: ``flux run``, ``flux init``, ``flux db upgrade``, ``flux config check``,
``flux report``, and the rule and plugin tools."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import orjson

from flux import __version__
from flux.config import Settings, load_settings
from flux.errors import ConfigError, FluxError, PortUnavailable
from flux.shipped import init, warn_missing_dirs
from flux.workers import WORKER_INDEX_ENV, attach_to_supervisor, run_workers

DEFAULT_CONFIG = "config.toml"
EXIT_CONFIG = 2
EXIT_FAILURE = 1


def _run_async(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _config_path(args: argparse.Namespace) -> Path | None:
    """The configuration file to read, or None for built-in defaults (no ./config.toml)."""
    path = Path(args.config)
    if not path.exists() and args.config == DEFAULT_CONFIG:
        return None
    return path


def _settings(args: argparse.Namespace) -> Settings:
    path = _config_path(args)
    if path is None:
        logging.getLogger("flux").warning("no %s here; using built-in defaults", DEFAULT_CONFIG)
    return load_settings(path)


def _cmd_run(args: argparse.Namespace) -> int:
    attach_to_supervisor()
    settings = _settings(args)
    if os.environ.get(WORKER_INDEX_ENV) is None:  # the supervisor warned already
        warn_missing_dirs(settings)
    if args.workers > 1:
        return run_workers(
            settings,
            count=args.workers,
            config=args.config,
            config_path=_config_path(args),
            log_level=args.log_level,
        )
    from flux.app import run

    _run_async(run(settings))
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.dir)
    written = init(target, force=args.force)
    print(
        f"wrote {len(written)} files (config.toml, rules/, plugins/) into {target.resolve()}; "
        "`flux run` there starts the gateway"
    )
    return 0


def _worker_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return value


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from flux.store.migrate import upgrade

    settings = _settings(args)
    upgrade(settings.database, args.revision)
    print(f"database at {settings.database.url.split('@')[-1]} upgraded to {args.revision}")
    return 0


#: Settings printed as "***" by ``flux config check`` when set.
SECRETS = (("server", "api_token"), ("mqtt", "password"))


def _cmd_config_check(args: argparse.Namespace) -> int:
    shown = _settings(args).model_dump(mode="json")
    for section, key in SECRETS:
        if shown[section][key]:
            shown[section][key] = "***"
    _print_json(shown)
    return 0


def _print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _rules_dir(args: argparse.Namespace) -> Path:
    return Path(args.path) if args.path else Path(_settings(args).rules.dir)


def _cmd_rules_validate(args: argparse.Namespace) -> int:
    from flux.rules import validate_rules

    report = validate_rules(_rules_dir(args))
    _print_json(report.to_dict())
    return 0 if report.ok else EXIT_FAILURE


def _cmd_rules_test(args: argparse.Namespace) -> int:
    from flux.rules import run_rule_test
    from flux.rules.tools import run_window_rule_test

    if (args.payload is None) == (args.events is None):
        raise FluxError("give either --payload (one message) or --events (a window rule test)")
    if args.events is not None:
        events = _test_events(args.events)
        windowed = run_window_rule_test(
            args.rule, events, topic=args.topic, path=_rules_dir(args), close_open=args.close_open
        )
        _print_json(windowed.to_dict())
        return EXIT_FAILURE if windowed.error is not None else 0
    payload = _json_object(args.payload, "--payload")
    result = run_rule_test(args.rule, payload, topic=args.topic, path=_rules_dir(args))
    _print_json(result.to_dict())
    return EXIT_FAILURE if result.error is not None else 0


def _test_events(text: str) -> list[Any]:
    """``--events``: a JSON list (or ``@file``) of ``{"payload": {...}, "ts": ..., "device_id"}``,
    or an object holding it under ``events``."""
    from flux.rules.testing import TimedEvent

    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise FluxError(f"--events: cannot read {text[1:]}: {exc}") from None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise FluxError(f"--events is not valid JSON: {exc}") from None
    if isinstance(value, dict):
        value = value.get("events")
    if not isinstance(value, list):
        raise FluxError('--events must be a JSON list of events (or {"events": [...]})')
    events = []
    for index, item in enumerate(value):
        payload = item.get("payload") if isinstance(item, dict) else None
        ts = item.get("ts") if isinstance(item, dict) else None
        if not isinstance(payload, dict) or not isinstance(ts, int | float):
            raise FluxError(f"--events[{index}] needs a 'payload' object and a number 'ts'")
        device, topic = item.get("device_id"), item.get("topic")
        events.append(
            TimedEvent(
                payload,
                float(ts),
                device if isinstance(device, str) else None,
                topic if isinstance(topic, str) else None,
            )
        )
    return events


def _plugin_manager(args: argparse.Namespace) -> Any:
    from flux.plugins import PluginManager

    settings = _settings(args)
    cache = settings.plugins.cache_dir
    return PluginManager(
        plugins_dir=Path(args.path or settings.plugins.dir),
        cache_dir=Path(cache) if cache else None,
        default_pool_size=1,
    )


def _cmd_plugins_list(args: argparse.Namespace) -> int:
    async def main() -> dict[str, Any]:
        async with _plugin_manager(args) as manager:
            return {
                "plugins": manager.describe_all(),
                "errors": {name: err.to_dict() for name, err in manager.load_errors.items()},
            }

    listing = asyncio.run(main())
    _print_json(listing)
    return EXIT_FAILURE if listing["errors"] else 0


def _cmd_plugins_test(args: argparse.Namespace) -> int:
    data = bytes.fromhex(args.hex) if args.hex else (args.payload or "{}").encode()

    async def main() -> list[dict[str, Any]]:
        async with _plugin_manager(args) as manager:
            outputs = await manager.test(args.name, data, topic=args.topic)
            return [{"topic": e.topic, "payload": e.payload, "hops": e.hops} for e in outputs]

    _print_json(asyncio.run(main()))
    return 0


def _gateway_call(
    args: argparse.Namespace, method: str, path: str, body: Any = None, timeout: float = 30
) -> Any:
    """Call a running gateway's API (``--url``/``--token``, else from the configuration);
    return the decoded JSON answer, or raise ``FluxError`` with what went wrong."""
    import httpx

    server = _settings(args).server
    url = args.url or (f"{'https' if server.uses_tls else 'http'}://{server.host}:{server.port}")
    token = args.token if args.token is not None else server.api_token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(
            method, f"{url.rstrip('/')}{path}", json=body, headers=headers, timeout=timeout
        )
    except httpx.HTTPError as exc:
        raise FluxError(f"cannot reach the gateway at {url}: {exc}") from None
    if response.status_code != 200:
        raise FluxError(f"{url} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def _cmd_report(args: argparse.Namespace) -> int:
    from flux.tuning import format_report

    report = _gateway_call(args, "GET", "/api/v1/report")
    if args.json:
        _print_json(report)
    else:
        print(format_report(report))
    return 0


def _cmd_rules_trace(args: argparse.Namespace) -> int:
    body = {"count": args.count, "timeout_s": args.timeout}
    trace = _gateway_call(
        args, "POST", f"/api/v1/rules/{args.rule}/trace", body, timeout=args.timeout + 10
    )
    if args.json:
        _print_json(trace)
        return 0
    for number, record in enumerate(trace["evaluations"], start=1):
        event = record["input"]
        line = (
            f"{number:>4} {record['result']:<11} {record['time_us']:>9.1f} us  "
            f"{event['device_id'] or '-'}  {event['topic']}  "
            f"{orjson.dumps(event['payload']).decode()}"
        )
        if record["output"] is not None:
            line += f"  -> {orjson.dumps(record['output']).decode()}"
        if record["error"] is not None:
            error = record["error"]
            line += f"  !! {error['kind']} at line {error['line']}: {error['message']}"
        print(line)
    seen = len(trace["evaluations"])
    if not trace["complete"]:
        print(f"{seen} of {args.count} evaluations within {args.timeout:g} s", file=sys.stderr)
    return 0


def _json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise FluxError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FluxError(f"{option} must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux",
        description="flux: an IoT edge gateway (MQTT/HTTP ingest, Lua rules, WASM plugins, SQL).",
    )
    parser.add_argument("--version", action="version", version=f"flux {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--config",
            "-c",
            default=DEFAULT_CONFIG,
            help="configuration file (default: ./config.toml; FLUX_<SECTION>__<KEY> overrides)",
        )
        return sub

    run = with_config(
        commands.add_parser(
            "run",
            help="start the gateway and run until SIGINT/SIGTERM",
            description="Start the gateway: migrate the database, connect MQTT (starting the "
            "embedded broker when none answers), serve the HTTP API; stop cleanly on SIGTERM.",
        )
    )
    run.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        metavar="N",
        help="gateway processes sharing the MQTT subscription ($share/<group>/...) and the "
        "database; worker i gets client id <client_id>-w<i> and ports server.port+i, "
        "metrics.port+i (default 1: this process, no supervisor)",
    )
    run.set_defaults(handler=_cmd_run)

    init_command = commands.add_parser(
        "init",
        help="write the shipped config.toml, rules/ and plugins/ into a directory",
        description="Write the commented config.toml, the shipped rules/ and plugins/ into "
        "DIR (default: here), so `flux run` finds them there. Existing files are left alone "
        "(nothing is written) unless --force.",
    )
    init_command.add_argument("dir", nargs="?", default=".", metavar="DIR")
    init_command.add_argument("--force", action="store_true", help="overwrite existing files")
    init_command.set_defaults(handler=_cmd_init)

    db = commands.add_parser("db", help="database commands")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    upgrade = with_config(
        db_commands.add_parser("upgrade", help="apply migrations up to a revision (default: head)")
    )
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.set_defaults(handler=_cmd_db_upgrade)

    config = commands.add_parser("config", help="configuration commands")
    config_commands = config.add_subparsers(
        dest="config_command", required=True, metavar="CONFIG_COMMAND"
    )
    check = with_config(
        config_commands.add_parser(
            "check", help="validate the configuration and print it with defaults filled in"
        )
    )
    check.set_defaults(handler=_cmd_config_check)

    rules = commands.add_parser(
        "rules", help="check and try rules; trace them on a running gateway"
    )
    rules_commands = rules.add_subparsers(
        dest="rules_command", required=True, metavar="RULES_COMMAND"
    )
    validate = with_config(
        rules_commands.add_parser(
            "validate", help="load and compile every rule; print errors with file and line"
        )
    )
    validate.add_argument("path", nargs="?", help="rule file or folder (default: [rules] dir)")
    validate.set_defaults(handler=_cmd_rules_validate)
    rule_test = with_config(
        rules_commands.add_parser(
            "test", help="evaluate one rule against a sample payload (no actions run)"
        )
    )
    rule_test.add_argument("rule", help="rule id")
    rule_test.add_argument("--payload", help="JSON object, e.g. '{\"temperature\": 31}'")
    rule_test.add_argument(
        "--events",
        help='window rules: JSON list (or @file) of {"payload": {...}, "ts": 1700000000, '
        '"device_id": "d1"} in arrival order; prints the windows that closed',
    )
    rule_test.add_argument(
        "--close-open", action="store_true", help="with --events: close the still-open windows too"
    )
    rule_test.add_argument("--topic", help="topic of the sample message")
    rule_test.add_argument("--path", help="rule file or folder (default: [rules] dir)")
    rule_test.set_defaults(handler=_cmd_rules_test)
    rule_trace = with_config(
        rules_commands.add_parser(
            "trace",
            help="show a rule's next evaluations on a running gateway's live traffic",
            description="Print the next evaluations of RULE on a running gateway (POST "
            "/api/v1/rules/RULE/trace): input, result, output, time and error of each.",
        )
    )
    rule_trace.add_argument("rule", help="rule id")
    rule_trace.add_argument("--count", type=int, default=20, help="evaluations (default 20)")
    rule_trace.add_argument(
        "--timeout", type=float, default=30, help="seconds to wait for them (default 30)"
    )
    _gateway_options(rule_trace)
    rule_trace.add_argument("--json", action="store_true", help="print the trace as JSON")
    rule_trace.set_defaults(handler=_cmd_rules_trace)

    plugins = commands.add_parser("plugins", help="inspect and try WebAssembly plugins")
    plugin_commands = plugins.add_subparsers(
        dest="plugins_command", required=True, metavar="PLUGINS_COMMAND"
    )
    listing = with_config(
        plugin_commands.add_parser(
            "list", help="load every plugin and print its manifest, limits and pool"
        )
    )
    listing.add_argument("--path", help="plugins folder (default: [plugins] dir)")
    listing.set_defaults(handler=_cmd_plugins_list)
    plugin_test = with_config(
        plugin_commands.add_parser(
            "test", help="call a plugin on a sample message and print what it emits"
        )
    )
    plugin_test.add_argument("name", help="plugin name")
    sample = plugin_test.add_mutually_exclusive_group()
    sample.add_argument("--payload", help="JSON message for json-input plugins")
    sample.add_argument("--hex", help="raw bytes as hex for raw-input plugins, e.g. 010d1e2d0bc400")
    plugin_test.add_argument("--topic", help="topic of the sample message")
    plugin_test.add_argument("--path", help="plugins folder (default: [plugins] dir)")
    plugin_test.set_defaults(handler=_cmd_plugins_test)

    report = with_config(
        commands.add_parser(
            "report",
            help="ask a running gateway for its tuning report: utilisation and advice",
            description="Print a running gateway's tuning report (GET /api/v1/report): "
            "per-stage utilisation over the sampled window and advice naming the setting, "
            "its current and suggested value and the figures behind it.",
        )
    )
    _gateway_options(report)
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.set_defaults(handler=_cmd_report)
    return parser


def _gateway_options(command: argparse.ArgumentParser) -> None:
    """``--url`` and ``--token`` of the commands that ask a running gateway."""
    command.add_argument(
        "--url", help="the gateway's API (default: from server.host and server.port)"
    )
    command.add_argument("--token", help="bearer token (default: server.api_token)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    worker = os.environ.get(WORKER_INDEX_ENV)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s "
        + (f"[w{worker}] " if worker is not None else "")
        + "%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("alembic", "gmqtt", "amqtt", "transitions", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))
    try:
        code: int = args.handler(args)
    except PortUnavailable as exc:
        print(f"flux: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        print(f"flux: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except FluxError as exc:
        print(f"flux: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
