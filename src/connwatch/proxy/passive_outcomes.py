"""OutcomeJudge: how each client connection to a target went, for passive health (SPEC section 10).

With `outlier_detection.enabled` a listener has one judge. It tells its `UpstreamOutcomes` sink
(the primary's outlier detector, or a worker's relay) per connection, at most once:

* failure: a connect to the target failed (reported by `UpstreamPool.reach`), or the upstream
  reset or closed the connection before `early_window` without sending a byte;
* success: the upstream sent a byte, or the connection outlived `early_window`;
* nothing: the client went away first, having heard nothing (neither side proved anything).

Per connection that is one `call_later` at open and one dict entry, cancelled at close; nothing on
the per-read path. A listener without the feature has no judge and pays one `None` test.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from connwatch._types import CloseReason, UpstreamOutcomes

if TYPE_CHECKING:
    from connwatch.proxy.connection import MonitoredConnection

_UPSTREAM_ENDED = frozenset({CloseReason.UPSTREAM_RESET, CloseReason.UPSTREAM_CLOSED})


class OutcomeJudge:
    __slots__ = ("_loop", "_pending", "early_window", "listener", "sink")

    def __init__(
        self,
        listener: str,
        early_window: float,
        sink: UpstreamOutcomes,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.listener = listener
        self.early_window = early_window
        self.sink = sink
        self._loop = loop
        self._pending: dict[MonitoredConnection, asyncio.TimerHandle] = {}

    def connect_failed(self, upstream: str) -> None:
        self.sink.upstream_failed(self.listener, upstream)

    def opened(self, conn: MonitoredConnection) -> None:
        """The upstream is connected: the early window starts now."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._pending[conn] = self._loop.call_later(self.early_window, self._outlived, conn)

    def closed(self, conn: MonitoredConnection) -> None:
        """The connection ended; judge it unless the early window had already passed."""
        handle = self._pending.pop(conn, None)
        if handle is None or conn.target is None:
            return
        handle.cancel()
        if conn.bytes_upstream_to_client:
            self.sink.upstream_succeeded(self.listener, conn.target.label)
        elif conn.reason in _UPSTREAM_ENDED:
            self.sink.upstream_failed(self.listener, conn.target.label)

    def _outlived(self, conn: MonitoredConnection) -> None:
        if self._pending.pop(conn, None) is not None and conn.target is not None:
            self.sink.upstream_succeeded(self.listener, conn.target.label)

    def close(self) -> None:
        """Forget every pending connection (the listener is retired or the feature turned off)."""
        for handle in self._pending.values():
            handle.cancel()
        self._pending.clear()

    @property
    def pending(self) -> int:
        return len(self._pending)
