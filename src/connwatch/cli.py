"""The `connwatch` command line. The only module that exits (SPEC section 2: 0 ok, 1 runtime
failure, 2 usage or configuration error)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog

from connwatch import __version__
from connwatch.commands.demo.traffic import add_demo_parser, cmd_demo
from connwatch.commands.probe import add_probe_parser, cmd_probe
from connwatch.commands.top.view import add_top_parser, cmd_top
from connwatch.exceptions import ConfigError, ListenerError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 on usage errors (its default) and never prints a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="connwatch", description="TCP connection-monitoring sidecar proxy.")
    parser.add_argument("--version", action="version", version=f"connwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", help="YAML config file (default: $CONNWATCH_CONFIG)")
    run.add_argument("--listen", help="listen address for a one-listener config, e.g. :7000")
    run.add_argument(
        "--upstream", action="append", default=[], help="upstream address (repeatable)"
    )

    check = sub.add_parser("check-config", help="validate a config and print the effective one")
    check.add_argument("-c", "--config", help="YAML config file (default: $CONNWATCH_CONFIG)")

    add_probe_parser(sub)
    add_demo_parser(sub)
    add_top_parser(sub)

    worker = sub.add_parser("_worker", help=argparse.SUPPRESS)  # started by the primary
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--fd", type=int, required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = COMMANDS[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"connwatch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


def _one_listener_base(args: argparse.Namespace) -> dict[str, Any] | None:
    from connwatch.config import one_listener_config

    if args.listen is None and not args.upstream:
        return None
    if args.listen is None or not args.upstream:
        raise ConfigError(["--listen and --upstream go together (one listener named 'default')"])
    if args.config:
        raise ConfigError(["give either -c FILE or --listen/--upstream, not both"])
    return one_listener_config(args.listen, list(args.upstream))


def cmd_run(args: argparse.Namespace) -> int:
    from connwatch.config import config_warnings
    from connwatch.observe.logs import configure_logging
    from connwatch.runtime.daemon import Daemon, load_for_run

    base = _one_listener_base(args)
    settings = load_for_run(args.config, base)
    configure_logging(settings.log.level, settings.log.format)
    log = structlog.get_logger("connwatch")
    for warning in config_warnings(settings):
        log.warning("config_warning", message=warning)
    config_path = args.config or (None if base else os.environ.get("CONNWATCH_CONFIG"))
    daemon = Daemon(settings, config_path=config_path, base_config=base)
    try:
        run_loop(daemon.run)
    except (ListenerError, OSError) as exc:
        print(f"connwatch: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from connwatch.config import config_warnings, effective_yaml, load_settings

    path = args.config or os.environ.get("CONNWATCH_CONFIG")
    if path is None:
        raise ConfigError(["no configuration: give -c FILE or set CONNWATCH_CONFIG"])
    settings = load_settings(path)
    for warning in config_warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(effective_yaml(settings))
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from connwatch.runtime.worker_process import run_worker

    run_loop(lambda: run_worker(args.index, args.fd))
    return EXIT_OK


def run_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `main` on uvloop when it is importable, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "check-config": cmd_check_config,
    "probe": cmd_probe,
    "demo": cmd_demo,
    "top": cmd_top,
    "_worker": cmd_worker,
}
