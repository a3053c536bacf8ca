"""The zero-copy Linux data path: `os.splice` socket → pipe → socket, under MonitoredConnection.

`transport.SpliceTransport` is an `asyncio.Transport` over a raw non-blocking socket, driven by
the loop's `add_reader`/`add_writer`; MonitoredConnection runs on it unchanged, so states, close
reasons, timers, observer calls and byte counts are those of the portable path. Only the bytes
take another road: socket → pipe → socket, never through user space. `pipes.PipePool` lends a
pipe only while bytes are in flight. `path.SplicePath` is what a listener uses in place of the
loop (to take over an accepted socket) and of its upstream pool (to reach a target).
See docs/data-paths.md for the reasoning.
"""

from __future__ import annotations

import os
import sys
from typing import Final

from connwatch.proxy.splice.path import SplicePath, open_socket
from connwatch.proxy.splice.pipes import (
    PipePool,
    PipePoolStats,
    fd_pressure,
    note_fd_pressure,
    pipe_pool,
    release_idle_pipes,
)
from connwatch.proxy.splice.transport import SpliceTransport

__all__ = [
    "SPLICE_AVAILABLE",
    "PipePool",
    "PipePoolStats",
    "SplicePath",
    "SpliceTransport",
    "fd_pressure",
    "note_fd_pressure",
    "open_socket",
    "pipe_pool",
    "release_idle_pipes",
    "uses_splice",
]

SPLICE_AVAILABLE: Final = sys.platform == "linux" and hasattr(os, "splice")


def uses_splice(data_path: str) -> bool:
    """Whether a listener's `data_path` means splice here (`auto`: where the kernel has it)."""
    return data_path == "splice" or (data_path == "auto" and SPLICE_AVAILABLE)
