"""`connwatch check-config`: validate a config and print the effective one (SPEC section 2).

Problems are raised as `ConfigError` naming the field and line (cli.py turns them into exit 2);
warnings go to stderr, the effective YAML to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from connwatch.exceptions import ConfigError

__all__ = ["add_check_config_parser", "cmd_check_config"]

EXIT_OK = 0


def add_check_config_parser(subparsers: Any) -> None:
    """Add the `check-config` subcommand to an argparse subparsers object."""
    check = subparsers.add_parser(
        "check-config", help="validate a config and print the effective one"
    )
    check.add_argument("-c", "--config", help="YAML config file (default: $CONNWATCH_CONFIG)")


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
