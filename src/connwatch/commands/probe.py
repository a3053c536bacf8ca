"""`connwatch probe ADDR --type ...`: one health check now, as the daemon would run it (SPEC §2).

The options are validated by the config module exactly as the `health_check` section of a
listener would be, so `probe` accepts what the daemon accepts; problems come back as a
`ConfigError` naming the option (cli.py turns it into exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import re
from typing import TYPE_CHECKING, Any

from connwatch.exceptions import ConfigError

if TYPE_CHECKING:
    from connwatch._types import Address
    from connwatch.config import HealthCheckConfig

__all__ = ["add_probe_parser", "cmd_probe", "probe_config"]

EXIT_HEALTHY, EXIT_UNHEALTHY = 0, 1

# Field path inside `health_check` (as config errors name it) -> the option that sets it.
_OPTIONS = {
    "type": "--type",
    "timeout": "--timeout",
    "port": "--port",
    "http.path": "--path",
    "http.scheme": "--scheme",
    "http.host": "--host",
    "http.expected_status": "--expected-status",
    "send_expect.send": "--send",
    "send_expect.expect": "--expect",
}
_SOURCE = "connwatch probe"


def add_probe_parser(subparsers: Any) -> None:
    """Add the `probe` subcommand to an argparse subparsers object."""
    probe = subparsers.add_parser(
        "probe",
        help="run one health check now and print the result",
        description="Run one health check against ADDR, like the daemon's; exit 0 when "
        "healthy, 1 when not. Escapes \\r \\n \\t \\0 \\\\ \\xNN work in --send and --expect.",
    )
    probe.add_argument("address", metavar="ADDR", help="HOST:PORT, [IPv6]:PORT or unix:/path")
    probe.add_argument(
        "--type",
        dest="check_type",
        default="tcp",
        choices=["tcp", "http", "send-expect", "heartbeat"],
        help="the check to run (default: tcp)",
    )
    probe.add_argument("--timeout", help="the whole check must finish within this (default: 2s)")
    probe.add_argument("--port", type=int, help="check this port instead of the one in ADDR")
    http = probe.add_argument_group("http")
    http.add_argument("--path", help="request path (default: /healthz)")
    http.add_argument("--scheme", help="http or https (certificates are not verified)")
    http.add_argument("--host", help="Host header (default: ADDR)")
    http.add_argument("--expected-status", help="healthy codes and ranges (default: 200-399)")
    send_expect = probe.add_argument_group("send-expect")
    send_expect.add_argument("--send", help="bytes to send (default: 'PING\\r\\n')")
    send_expect.add_argument(
        "--expect", help="reply prefix, or re:REGEX to search the reply (default: '+PONG')"
    )


def probe_config(args: argparse.Namespace) -> tuple[Address, HealthCheckConfig]:
    """(Address, HealthCheckConfig) from the parsed options; ConfigError names bad ones."""
    from connwatch.config import load_settings

    check: dict[str, Any] = {"type": args.check_type.replace("-", "_")}
    for key in ("timeout", "port"):
        if getattr(args, key) is not None:
            check[key] = getattr(args, key)
    for section, keys in (
        ("http", ("path", "scheme", "host", "expected_status")),
        ("send_expect", ("send", "expect")),
    ):
        given = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
        if given:
            check[section] = given
    listener = {
        "name": "probe",
        "listen": "127.0.0.1:0",
        "upstreams": [args.address],
        "health_check": check,
    }
    try:
        settings = load_settings(None, base={"listeners": [listener]}, env={})
    except ConfigError as exc:
        raise ConfigError([_option_issue(i, exc.source) for i in exc.issues], _SOURCE) from None
    cfg = settings.listeners[0]
    return cfg.upstreams[0], cfg.health_check


def _option_issue(issue: str, source: str | None) -> str:
    """`<src>: listeners[0].health_check.timeout = 'x': why` -> `--timeout = 'x': why`."""
    text = issue.removeprefix(f"{source}: ") if source else issue
    match = re.match(r"listeners\[0\]\.(health_check\.)?([\w.]+(?:\[\d+\])?)", text)
    if match is None:
        return text
    field = match.group(2)
    name = _OPTIONS.get(field) if match.group(1) else None
    if field.startswith("upstreams"):
        name = "ADDR"
    return f"{name}{text[match.end() :]}" if name else text


def cmd_probe(args: argparse.Namespace) -> int:
    """Run one check; print `healthy|unhealthy <latency> <detail>`; 0 healthy, 1 not."""
    from connwatch.health.checks import run_check

    address, cfg = probe_config(args)
    result = asyncio.run(run_check(address, cfg))
    verdict = "healthy" if result.ok else "unhealthy"
    print(f"{verdict} {result.latency_s * 1000:.3f}ms {result.detail}", flush=True)
    return EXIT_HEALTHY if result.ok else EXIT_UNHEALTHY
