"""The canonical per-connection log lines: `connection_opened`, `connection_progress` and one
`connection_closed` per connection, with an optional per-second budget so that connection churn
at thousands a second cannot flood the log (the rest is counted and summed up once a second)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from connwatch.observe.logs import get_logger, line_writer, stamped_writer
from connwatch.proxy.connection import MonitoredConnection


class ConnectionEvents:
    """Writes connection lines; `enabled` and `limit` follow the `log` config (and reloads)."""

    def __init__(self, *, enabled: bool = True, limit: int = 0) -> None:
        self.enabled = enabled
        self.limit = limit  # lines a second; 0 = no limit
        self._second = 0
        self._written = 0
        self._suppressed: Counter[str] = Counter()
        self._summary: asyncio.TimerHandle | None = None
        self.refresh_logger()

    def refresh_logger(self) -> None:
        # The connection lines: (event, fields dict), no keyword-argument call per line.
        self._line = line_writer("connwatch.connection")
        # The opened/closed lines, whole dicts ending in event, level and timestamp (the tracker
        # builds them in one display: see `JsonInfoLines.stamped`).
        self.write = stamped_writer("connwatch.connection")
        self._log = get_logger("connwatch.connection")  # the rest

    def configure(self, *, enabled: bool, limit: int) -> None:
        self.enabled, self.limit = enabled, limit
        self.refresh_logger()

    def opened(self, conn: MonitoredConnection) -> None:
        # Direct reads, as in `closed`: once per connection, no snapshot, no property calls.
        if self.enabled and (not self.limit or self.admit("connection_opened")):
            target = conn.target
            self.write(
                {
                    "conn_id": conn.id,
                    "listener": conn.listener,
                    "client": conn.client,
                    "upstream": None if target is None else target.label,
                    "event": "connection_opened",
                    "level": "info",
                    "timestamp": "",
                }
            )

    def closed(
        self, conn: MonitoredConnection, reason: str, duration: float, c2u: int, u2c: int
    ) -> None:
        """The one `connection_closed` line; `c2u`, `u2c`: the bytes each way, as the tracker
        read them. It reads the connection directly: this runs once per connection, and a
        `statistics()` snapshot here cost +4 % instructions per connection
        (bench/instructions.py churn)."""
        if self.enabled and (not self.limit or self.admit("connection_closed")):
            target = conn.target
            self.write(
                {
                    "conn_id": conn.id,
                    "listener": conn.listener,
                    "client": conn.client,
                    "upstream": None if target is None else target.label,
                    # round(duration, 6), but for a value within a float rounding error of a
                    # half microsecond (then 1e-6 apart): round() with digits goes through a
                    # decimal string and back, ~2.5k instructions against ~0.3k.
                    "duration_s": round(duration * 1e6) / 1e6,
                    "bytes_client_to_upstream": c2u,
                    "bytes_upstream_to_client": u2c,
                    "reason": reason,
                    "event": "connection_closed",
                    "level": "info",
                    "timestamp": "",
                }
            )

    def progress(self, conns: Iterable[MonitoredConnection], min_age: float) -> None:
        """One `connection_progress` line for each connection at least `min_age` old."""
        now = time.monotonic()
        for conn in conns:
            if conn.age(now) < min_age:  # most connections are short: no snapshot for them
                continue
            stats = conn.statistics(now)
            self._line(
                "connection_progress",
                {
                    "conn_id": stats.id,
                    "listener": stats.listener,
                    "client": stats.client,
                    "upstream": stats.upstream,
                    "age_s": round(stats.age, 3),
                    "idle_s": round(stats.idle, 3),
                    "bytes_client_to_upstream": stats.bytes_client_to_upstream,
                    "bytes_upstream_to_client": stats.bytes_upstream_to_client,
                },
            )

    def admit(self, event: str) -> bool:
        if not self.limit:
            return True
        second = int(time.monotonic())
        if second != self._second:
            self._second, self._written = second, 0
        if self._written < self.limit:
            self._written += 1
            return True
        self._suppressed[event] += 1
        if self._summary is None:
            self._summary = asyncio.get_running_loop().call_later(1.0, self._summarize)
        return False

    def _summarize(self) -> None:
        self._summary = None
        counts: dict[str, Any] = {
            k.removeprefix("connection_"): v for k, v in self._suppressed.items()
        }
        self._suppressed.clear()
        if counts:
            self._log.warning("connection_events_suppressed", limit_per_s=self.limit, **counts)

    def close(self) -> None:
        if self._summary is not None:
            self._summary.cancel()
            self._summarize()
