"""The `connwatch` command line: argparse and dispatch. The only module that exits (SPEC
section 2: 0 ok, 1 runtime failure, 2 usage or configuration error).

Each subcommand lives in `connwatch.commands` and returns its exit code or raises; a
`ConfigError` from any of them is printed here and becomes exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from connwatch import __version__
from connwatch.commands.check_config import add_check_config_parser, cmd_check_config
from connwatch.commands.demo.command import add_demo_parser, cmd_demo
from connwatch.commands.probe import add_probe_parser, cmd_probe
from connwatch.commands.run import add_run_parser, add_worker_parser, cmd_run, cmd_worker
from connwatch.commands.top.command import add_top_parser, cmd_top
from connwatch.exceptions import ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 on usage errors (its default) and never prints a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="connwatch", description="TCP connection-monitoring sidecar proxy.")
    parser.add_argument("--version", action="version", version=f"connwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_run_parser(sub)
    add_check_config_parser(sub)
    add_probe_parser(sub)
    add_demo_parser(sub)
    add_top_parser(sub)
    add_worker_parser(sub)  # hidden: started by the primary
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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "check-config": cmd_check_config,
    "probe": cmd_probe,
    "demo": cmd_demo,
    "top": cmd_top,
    "_worker": cmd_worker,
}
