"""Keyboard input for `connwatch top` (and `connwatch demo`): key presses, one by one.

The terminal is put in cbreak mode (keys arrive one by one without echo; Ctrl-C still works)
and restored on every way out.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from types import TracebackType
from typing import Any, Final, TextIO

__all__ = ["QUIT_KEYS", "SORT_KEYS", "Keys"]

SORT_KEYS: Final = {"b": "bytes", "a": "age", "i": "idle", "r": "rtt"}
QUIT_KEYS: Final = frozenset("qQ")


class Keys:
    """Key presses from a terminal in cbreak mode; restores the terminal's modes on exit.

    Without a terminal on `stream` it reads nothing (and `read` just waits).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        stream = sys.stdin if stream is None else stream
        self.fd: int | None = None
        with contextlib.suppress(AttributeError, OSError, ValueError):
            if stream.isatty():
                self.fd = stream.fileno()
        self._saved: list[Any] | None = None

    def __enter__(self) -> Keys:
        if self.fd is not None:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd, termios.TCSANOW)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.fd is not None and self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def read(self, timeout: float) -> str:
        """Keys typed so far (waiting up to `timeout` for the first); "" when none."""
        if self.fd is None:
            time.sleep(timeout)
            return ""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return self.read_now() if ready else ""

    def read_now(self) -> str:
        """What is waiting on the terminal now (call when it is readable)."""
        if self.fd is None:
            return ""
        data = os.read(self.fd, 64)
        if not data:  # the terminal went away: stop reading keys
            self.fd = None
            return ""
        if data.startswith(b"\x1b"):  # arrow keys and other escape sequences: not ours
            return ""
        return data.decode(errors="ignore")
