"""`connwatch top`: a live terminal table of a running daemon's connections (SPEC section 2).

The table is redrawn from the admin API once a second (`admin_client.Poller`) and at once on a
key press (`keys.Keys`); without a terminal it prints a summary line a second instead. Output is
plain ANSI through rich, no mouse, so it works over SSH and inside tmux or screen.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Final

from connwatch.commands.top.admin_client import REFRESH_S, AdminClient, Poller
from connwatch.commands.top.keys import Keys
from connwatch.commands.top.model import SORTS, Snapshot
from connwatch.commands.top.view import View, is_unicode
from connwatch.exceptions import AdminApiError

if TYPE_CHECKING:  # rich is imported when used: the CLI starts faster
    from rich.console import Console

__all__ = ["DEFAULT_ADMIN", "add_top_parser", "cmd_top"]

DEFAULT_ADMIN: Final = "http://127.0.0.1:9464"
_KEY_POLL_S: Final = 0.1  # how often the UI thread looks for keys and new data
_PIPE_WIDTH: Final = 200  # columns when the output is not a terminal (--once into a file)

EXIT_OK, EXIT_FAILURE = 0, 1


def add_top_parser(subparsers: Any) -> None:
    """Add the `top` subcommand to an argparse subparsers object."""
    top = subparsers.add_parser(
        "top",
        help="live table of a running daemon's connections",
        description="Live table of a running daemon's connections, read from its admin API "
        "every second. Keys: b, a, i, r sort by bytes, age, idle, RTT; c switches to the busiest "
        "clients (a, n, b, x sort them by active, accepted, bytes, rejected); u switches to the "
        "upstreams view; q quits. Exit 1 when "
        "the daemon cannot be reached or goes away.",
    )
    top.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        metavar="URL",
        help=f"the daemon's admin endpoint (default: {DEFAULT_ADMIN})",
    )
    top.add_argument(
        "--sort", choices=SORTS, default="bytes", help="initial sort order (default: bytes)"
    )
    top.add_argument("--listener", metavar="NAME", help="show only this listener")
    top.add_argument("--once", action="store_true", help="print the table once and exit")
    top.add_argument(
        "--upstreams",
        action="store_true",
        help="start in the upstreams view (state, cause, ejection, slow-start weight, pool); "
        "key u switches",
    )


def cmd_top(args: argparse.Namespace) -> int:
    from rich.console import Console

    client = AdminClient(args.admin, args.listener)
    try:
        first = client.snapshot()
    except (AdminApiError, TimeoutError) as exc:
        print(f"connwatch top: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=_PIPE_WIDTH)
    view = View(source=client.base_url, sort=args.sort, listener=args.listener)
    view.upstreams = args.upstreams
    view.observe(first)
    if args.once:
        view.keys = False
        console.print(view.render(first, unicode=is_unicode(console)))
        return EXIT_OK
    if not console.is_terminal:
        return _plain(view, client, first)
    return _live(console, view, client, first)


def _live(console: Console, view: View, client: AdminClient, first: Snapshot) -> int:
    from rich.live import Live

    poller = Poller(client)
    unicode = is_unicode(console)
    snapshot, stale = first, None
    poller.start()
    try:
        with (
            Keys() as keys,
            Live(
                console=console,
                screen=True,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live,
        ):
            view.keys = keys.fd is not None
            dirty = True
            while poller.error is None:
                if dirty:
                    live.update(
                        view.render(snapshot, height=console.height, stale=stale, unicode=unicode),
                        refresh=True,
                    )
                action = view.press(keys.read(_KEY_POLL_S))
                if action == "quit":
                    return EXIT_OK
                fresh = poller.take()
                dirty = action == "sort" or fresh is not None or stale != poller.stale
                stale = poller.stale
                if fresh is not None:
                    view.observe(fresh)
                    snapshot = fresh
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        poller.close()
    print(f"connwatch top: the daemon went away: {poller.error}", file=sys.stderr)
    return EXIT_FAILURE


def _plain(view: View, client: AdminClient, first: Snapshot) -> int:
    """No terminal: one summary line a second (like `top -b`), until the daemon goes away."""
    snapshot: Snapshot | None = first
    try:
        while True:
            if snapshot is not None:
                print(view.summary(snapshot), flush=True)
            time.sleep(REFRESH_S)
            try:
                snapshot = client.snapshot()
            except TimeoutError as exc:
                print(f"stale: {exc}", flush=True)
                snapshot = None
                continue
            view.observe(snapshot)
    except AdminApiError as exc:
        print(f"connwatch top: the daemon went away: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (KeyboardInterrupt, BrokenPipeError):  # Ctrl-C, or the reader left (`| head`)
        with contextlib.suppress(OSError, ValueError):  # no second error at exit's flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
