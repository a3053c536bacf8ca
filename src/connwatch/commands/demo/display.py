"""What `connwatch demo` shows while it runs: `connwatch top`'s live table on a terminal
(drawn from the in-process daemon), else a summary line a second."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable
from typing import IO, TYPE_CHECKING, Any, Final

from connwatch.commands.demo.embedded_daemon import daemon_snapshot
from connwatch.commands.top.keys import Keys
from connwatch.commands.top.view import View, is_unicode

if TYPE_CHECKING:
    from rich.console import Console

    from connwatch.runtime.daemon import Daemon

__all__ = ["Display", "say"]

_LOG_LINES: Final = 8  # lines printed above the live table
_FIRST_FRAME: Final = 0.5  # seconds of traffic before the first frame, so that it has rows


class Display:
    """The live table on a terminal (keys b/a/i/r sort, q quits), else a summary line a second."""

    def __init__(self, daemon: Daemon, view: View, stop: asyncio.Event, out: IO[str]) -> None:
        self.daemon = daemon
        self.view = view
        self.stop = stop
        self.out = out
        self._redraw = asyncio.Event()

    async def run(self, console: Console | None) -> None:
        if console is None:
            await self._plain()
            return
        from rich.live import Live

        loop = asyncio.get_running_loop()
        with (
            Keys() as keys,
            Live(console=console, auto_refresh=False, redirect_stdout=False) as live,
        ):
            self.view.keys = keys.fd is not None
            if keys.fd is not None:
                loop.add_reader(keys.fd, self._on_key, keys)
            try:
                await self._wait(_FIRST_FRAME)
                while not self.stop.is_set():
                    snapshot = await daemon_snapshot(self.daemon)
                    self.view.observe(snapshot)
                    height = max(8, console.height - _LOG_LINES)
                    unicode = is_unicode(console)
                    live.update(self.view.render(snapshot, height=height, unicode=unicode))
                    live.refresh()
                    await self._wait(1.0)
            finally:
                if keys.fd is not None:
                    loop.remove_reader(keys.fd)

    def _on_key(self, keys: Keys) -> None:
        action = self.view.press(keys.read_now())
        if action == "quit":
            self.stop.set()
        elif action == "sort":
            self._redraw.set()

    async def _wait(self, seconds: float) -> None:
        self._redraw.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await _first(self.stop.wait(), self._redraw.wait())

    async def _plain(self) -> None:
        started = time.monotonic()
        await self._wait(_FIRST_FRAME)
        while not self.stop.is_set():
            snapshot = await daemon_snapshot(self.daemon)
            self.view.observe(snapshot)
            elapsed = time.monotonic() - started
            if not say(self.out, f"[{elapsed:5.1f}s] {self.view.summary(snapshot)}"):
                self.stop.set()  # the reader went away (`connwatch demo | head`): end quietly
            await self._wait(1.0)


def say(out: IO[str], text: str) -> bool:
    """Print a line; False when the reader has gone (a closed pipe), which is not an error."""
    try:
        print(text, file=out, flush=True)
    except BrokenPipeError:
        # Point the descriptor at /dev/null so that the flush at exit does not fail again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return False
    return True


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of `aws` is done; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
