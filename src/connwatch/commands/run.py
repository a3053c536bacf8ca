"""`connwatch run`: the daemon in the foreground (SPEC section 2), and `_worker`, the hidden
subcommand the primary starts each worker process with.

Configuration problems are raised as `ConfigError` (cli.py turns them into exit 2); a listener
that cannot bind is printed and returned as exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import structlog

from connwatch.commands.event_loop import run_loop
from connwatch.exceptions import ConfigError, ListenerError, WorkerStartError
from connwatch.runtime.upgrade.messages import UpgradeError

__all__ = ["add_run_parser", "add_worker_parser", "cmd_run", "cmd_worker"]

EXIT_OK, EXIT_FAILURE = 0, 1


def add_run_parser(subparsers: Any) -> None:
    """Add the `run` subcommand to an argparse subparsers object."""
    run = subparsers.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", help="YAML config file (default: $CONNWATCH_CONFIG)")
    run.add_argument("--listen", help="listen address for a one-listener config, e.g. :7000")
    run.add_argument(
        "--upstream", action="append", default=[], help="upstream address (repeatable)"
    )
    run.add_argument(
        "--takeover",
        action="store_true",
        help="take the listeners over from the connwatch serving upgrade_socket (seamless upgrade)",
    )
    run.add_argument(
        "--takeover-if-running",
        action="store_true",
        help="like --takeover when a connwatch answers on upgrade_socket; else start normally",
    )


def add_worker_parser(subparsers: Any) -> None:
    """Add the hidden `_worker` subcommand (started by the primary, not by people)."""
    worker = subparsers.add_parser("_worker", help=argparse.SUPPRESS)
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--fd", type=int, required=True)


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
    if getattr(args, "takeover", False) or getattr(args, "takeover_if_running", False):
        return _run_takeover(
            settings, config_path, base, fallback=getattr(args, "takeover_if_running", False)
        )
    daemon = Daemon(settings, config_path=config_path, base_config=base)
    try:
        run_loop(daemon.run)
    except (ListenerError, OSError, UpgradeError, WorkerStartError) as exc:
        print(f"connwatch: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _run_takeover(
    settings: Any, config_path: str | None, base: dict[str, Any] | None, *, fallback: bool
) -> int:
    """`run --takeover`: receive the listening sockets from the running connwatch before binding
    anything, then serve; any failure before the old process let go leaves it serving. With
    `fallback` (`--takeover-if-running`), no process at upgrade_socket means a normal start."""
    from connwatch.runtime.daemon import Daemon
    from connwatch.runtime.upgrade.takeover import Takeover

    path = settings.upgrade_socket
    if path is None:
        raise ConfigError(
            [
                "--takeover needs upgrade_socket in the configuration: the path the running"
                " connwatch serves"
            ]
        )

    async def main() -> None:
        try:
            takeover = await Takeover.connect(path)
        except UpgradeError as exc:
            if not (
                fallback and isinstance(exc.__cause__, FileNotFoundError | ConnectionRefusedError)
            ):
                raise
            log = structlog.get_logger("connwatch")
            log.info("upgrade_skipped", reason=str(exc), message="no running connwatch: starting")
            await Daemon(settings, config_path=config_path, base_config=base).run()
            return
        try:
            daemon = Daemon(settings, config_path=config_path, base_config=base, takeover=takeover)
            await daemon.run()
        except BaseException:
            takeover.abandon()
            raise

    try:
        run_loop(main)
    except (ListenerError, OSError, UpgradeError, WorkerStartError) as exc:
        print(
            f"connwatch: takeover failed: {exc}; the running connwatch keeps serving",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from connwatch.runtime.worker_process import run_worker

    run_loop(lambda: run_worker(args.index, args.fd))
    return EXIT_OK
