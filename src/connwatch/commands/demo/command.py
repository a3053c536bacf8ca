"""`connwatch demo`: connwatch at work in one command, no file and no other service (SPEC §2).

One process, one loop: a built-in upstream on loopback (`upstream`), the real `Daemon` in front
of it with its admin endpoint (`embedded_daemon`), and a traffic generator (`traffic`). The live
table is `connwatch top`'s view (`display`), drawn from the daemon in-process.

The daemon's logs go to a file in a temporary directory, so they cannot garble the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from connwatch.commands.demo.display import Display, say
from connwatch.commands.demo.embedded_daemon import ADMIN_PORT, LISTENER, start_daemon
from connwatch.commands.demo.traffic import Traffic
from connwatch.commands.demo.upstream import LOOPBACK, DemoUpstream
from connwatch.commands.event_loop import run_loop
from connwatch.commands.top.view import View

if TYPE_CHECKING:
    from connwatch.runtime.daemon import Daemon

__all__ = ["add_demo_parser", "cmd_demo"]


def _duration_arg(text: str) -> float:
    from connwatch.config.units import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the duration must be more than 0")
    return seconds


def add_demo_parser(subparsers: Any) -> None:
    """Add the `demo` subcommand to an argparse subparsers object."""
    demo = subparsers.add_parser(
        "demo",
        help="run a built-in upstream, connwatch and traffic, and show the live table",
        description="Start a built-in upstream, connwatch in front of it with the admin endpoint "
        "on 127.0.0.1:9464 (another port if taken) and a traffic generator, all on loopback; "
        "print the admin URLs and show the live connection table until Ctrl-C.",
    )
    demo.add_argument(
        "--duration",
        type=_duration_arg,
        metavar="S",
        help="stop after this long (e.g. 30, 30s, 2m); default: until Ctrl-C",
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from connwatch.exceptions import ListenerError

    try:
        run_loop(lambda: _demo(args.duration, sys.stdout))
    except (ListenerError, OSError) as exc:
        print(f"connwatch demo: {exc}", file=sys.stderr)
        return 1
    return 0


async def _demo(duration: float | None, out: IO[str]) -> None:
    from connwatch.observe.logs import configure_logging

    log_dir = Path(tempfile.mkdtemp(prefix="connwatch-demo-"))
    log_path = log_dir / "connwatch.log"
    with log_path.open("w", encoding="utf-8") as log_file:
        configure_logging("info", "json", stream=log_file)
        try:
            await _serve(duration, out, log_path)
        finally:
            configure_logging("warning", "json", stream=sys.stderr)
    say(out, f"demo finished; the daemon's log is {log_path}")


async def _serve(duration: float | None, out: IO[str], log_path: Path) -> None:
    upstream = await DemoUpstream().start()
    try:
        daemon = await start_daemon(upstream.address)
        try:
            await _with_daemon(daemon, upstream, duration, out, log_path)
        finally:
            await daemon.shutdown()
    finally:
        upstream.close()


async def _with_daemon(
    daemon: Daemon, upstream: DemoUpstream, duration: float | None, out: IO[str], log_path: Path
) -> None:
    from rich.console import Console

    admin = f"http://{LOOPBACK}:{daemon.admin.port}"
    proxy = f"{LOOPBACK}:{daemon.listeners[LISTENER].port}"
    moved = "" if daemon.admin.port == ADMIN_PORT else f"  ({ADMIN_PORT} is taken)"
    say(
        out,
        f"connwatch demo: proxy {proxy} -> built-in upstream {upstream.address}, traffic running\n"
        f"  metrics      {admin}/metrics{moved}\n"
        f"  connections  {admin}/connections\n"
        f"  readyz       {admin}/readyz\n"
        f"  log          {log_path}\n"
        f"  also try     connwatch top --admin {admin}   (in another terminal)\n"
        f"{'Ctrl-C' if duration is None else f'{duration:g}s, or Ctrl-C,'} ends the demo.",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = _on_signals(loop, stop, daemon)
    if duration is not None:
        loop.call_later(duration, stop.set)
    console = Console(file=out, highlight=False) if out.isatty() else None
    view = View(source=admin, sort="bytes")
    traffic = Traffic(daemon.listeners[LISTENER].port, stop)
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(traffic.run())
            group.create_task(Display(daemon, view, stop, out).run(console))
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    say(out, f"stopping: {traffic.opened} client connections were opened")


def _on_signals(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, daemon: Daemon
) -> list[signal.Signals]:
    """Ctrl-C or SIGTERM ends the demo; a second one also aborts open connections at once."""
    from connwatch._types import CloseReason

    def handle() -> None:
        if stop.is_set():
            for conn in list(daemon.tracker.connections()):
                conn.close(CloseReason.SHUTDOWN, abort=True)
        stop.set()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, handle)
            installed.append(sig)
    return installed
