"""Command line: ``flux run``, ``flux db upgrade``, ``flux config check``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from flux import __version__
from flux.config import Settings, load_settings
from flux.errors import ConfigError, FluxError

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


def _settings(args: argparse.Namespace) -> Settings:
    path = Path(args.config)
    if not path.exists() and args.config == DEFAULT_CONFIG:
        logging.getLogger("flux").warning("no %s here; using built-in defaults", DEFAULT_CONFIG)
        return load_settings(None)
    return load_settings(path)


def _cmd_run(args: argparse.Namespace) -> int:
    from flux.app import run

    settings = _settings(args)
    _run_async(run(settings))
    return 0


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from flux.store.migrate import upgrade

    settings = _settings(args)
    upgrade(settings.database, args.revision)
    print(f"database at {settings.database.url.split('@')[-1]} upgraded to {args.revision}")
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(settings.model_dump_json(indent=2))
    return 0


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
    run.set_defaults(handler=_cmd_run)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("alembic", "gmqtt", "amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))
    try:
        code: int = args.handler(args)
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
