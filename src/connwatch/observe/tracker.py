"""Live connections and the running totals of closed ones; the canonical per-connection log lines.

The tracker is the connections' observer. Totals are plain ints updated once per connection (and
once per flow-control pause); metrics and admin read `statistics()` and `connections()`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Final

from connwatch._types import CloseReason, ConnectionState, Direction, rfc3339
from connwatch.histogram import DURATION_BUCKETS, Histogram
from connwatch.observe.clients import ClientSummary
from connwatch.observe.connection_lines import ConnectionEvents
from connwatch.proxy.connection import MonitoredConnection
from connwatch.snapshots import ConnectionStats, ListenerStats

# Enum members read for every close, as globals: on Python 3.11 `CloseReason.ERROR` goes through
# the enum metaclass's attribute hook (~0.17 µs against ~0.01 µs).
_ERROR: Final = CloseReason.ERROR


class ListenerTotals:
    """Counters of one listener, as plain ints, and its bounded client view."""

    __slots__ = (
        "accepted",
        "active",
        "bytes_c2u",
        "bytes_u2c",
        "clients",
        "closed",
        "duration",
        "flow_paused",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.active = 0  # live connections
        # By reason, in the order first seen: a plain dict (a Counter's += is a dict subclass's
        # generic subscript and store; this is once per connection).
        self.closed: dict[str, int] = {}
        # Bytes of the connections now closed, by direction: ints, not a Counter by Direction
        # (a Counter is a dict subclass: its `+=` is a generic subscript, twice per close).
        self.bytes_c2u = 0
        self.bytes_u2c = 0
        self.flow_paused: Counter[str] = Counter()
        self.duration = Histogram(DURATION_BUCKETS)
        # Here, not in a dict of its own: the listener holds its totals and feeds `seen`
        # directly, and the close reads it with them (no lookup by name per connection). The
        # same object for the tracker's life, reloads included.
        self.clients = ClientSummary()


class Tracker:
    """All connections of this process, by id, and per-listener totals."""

    def __init__(
        self, *, worker: int = 0, events: ConnectionEvents | None = None, log_events: bool = True
    ) -> None:
        self._live: dict[str, MonitoredConnection] = {}
        self._totals: dict[str, ListenerTotals] = {}
        self._seq = itertools.count(1)
        self._id_prefix = f"{worker}-"  # ids are `worker-seq`
        self._empty = asyncio.Event()
        self._empty.set()
        self.events = events or ConnectionEvents(enabled=log_events)
        # An opened connection is its `connection_opened` line and nothing else here (its
        # target's count is the listener's): the line writer's method itself, no call between.
        self.connection_opened: Callable[[MonitoredConnection], None] = self.events.opened

    # -- ids and registration -------------------------------------------------------------------
    def next_id(self) -> str:
        return self._id_prefix + str(next(self._seq))

    def totals(self, listener: str) -> ListenerTotals:
        totals = self._totals.get(listener)
        if totals is None:
            totals = self._totals[listener] = ListenerTotals()
        return totals

    def accepted(self, conn: MonitoredConnection) -> None:
        """A client was accepted (it counts even if it is refused at once)."""
        name = conn.listener
        totals = self._totals.get(name) or self.totals(name)
        totals.accepted += 1
        totals.active += 1
        if not self._live:  # (already clear otherwise: no call for every connection)
            self._empty.clear()
        self._live[conn.id] = conn

    def shed(self, listener: str) -> None:
        """A client accepted and closed at once because the process had no fd to serve it."""
        totals = self.totals(listener)
        totals.accepted += 1
        totals.closed[_ERROR] = totals.closed.get(_ERROR, 0) + 1
        totals.duration.observe(0.0)

    # -- ConnectionObserver ---------------------------------------------------------------------
    def connection_closed(self, conn: MonitoredConnection) -> None:
        if self._live.pop(conn.id, None) is None:
            return
        name = conn.listener
        totals = self._totals.get(name) or self.totals(name)
        totals.active -= 1
        # Direct reads, not conn.statistics(): a frozen snapshot here cost +4 % instructions
        # per connection (bench/instructions.py churn); the close path stays plain reads, and
        # the connection line is given what was read here rather than reading it again.
        reason = conn.reason or _ERROR  # (set when closed: the fallback is for a test's fake)
        closed = totals.closed
        closed[reason] = closed.get(reason, 0) + 1
        # The byte-count properties' bodies inline (a property is a Python call on 3.11).
        up = conn.upstream_leg
        c2u, u2c = conn.client_leg.bytes_in if up.transport else 0, up.bytes_in
        totals.bytes_c2u += c2u
        totals.bytes_u2c += u2c
        duration = conn.closed_at - conn.opened_at if conn.closed_at else conn.age()
        totals.duration.observe(duration)
        key = conn.client_key
        if key is not None:
            totals.clients.closed(key, c2u, u2c, conn.opened_wall + duration)
        # The reason as it is: a str enum, rendered as its value (orjson, structlog alike).
        self.events.closed(conn, reason, duration, c2u, u2c)
        if not self._live:
            self._empty.set()

    def flow_paused(self, conn: MonitoredConnection, direction: Direction) -> None:
        self.totals(conn.listener).flow_paused[direction] += 1

    def clients(self, listener: str) -> ClientSummary:
        """The bounded per-client view of one listener (SPEC section 12)."""
        return self.totals(listener).clients

    def client_summaries(self) -> dict[str, ClientSummary]:
        """The client views that have seen a client (a view is never empty after that)."""
        return {name: t.clients for name, t in self._totals.items() if len(t.clients)}

    def client_records(self, listener: str | None = None) -> list[dict[str, Any]]:
        """Raw `/clients` records of this process, bytes of open connections included."""
        live: dict[str, dict[str, list[int]]] = {}
        for conn in self._live.values():
            if conn.client_key is not None and (listener is None or conn.listener == listener):
                acc = live.setdefault(conn.listener, {}).setdefault(conn.client_key, [0, 0])
                acc[0] += conn.bytes_client_to_upstream
                acc[1] += conn.bytes_upstream_to_client
        out: list[dict[str, Any]] = []
        for name, summary in self.client_summaries().items():
            if listener is None or name == listener:
                out.extend(summary.records(name, live.get(name)))
        return out

    # -- reading --------------------------------------------------------------------------------
    def get(self, conn_id: str) -> MonitoredConnection | None:
        return self._live.get(conn_id)

    def connections(self, listener: str | None = None) -> Iterator[MonitoredConnection]:
        for conn in list(self._live.values()):
            if listener is None or conn.listener == listener:
                yield conn

    def active(self, listener: str) -> int:
        totals = self._totals.get(listener)
        return 0 if totals is None else totals.active

    def __len__(self) -> int:
        return len(self._live)

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def statistics(self) -> dict[str, ListenerStats]:
        """Per-listener snapshot; bytes include what open connections have moved so far."""
        live_bytes: dict[str, list[int]] = {}
        active: Counter[str] = Counter()
        upstream_active: dict[str, Counter[str]] = {}
        # The ledger sums the live connections' plain-int counters (STYLE habit 3) rather than
        # taking a frozen snapshot of each: at 10,000 open connections that is ~4 ms a scrape
        # instead of ~18 ms. /connections, which shows each one, reads snapshots.
        for conn in self._live.values():
            name = conn.listener
            active[name] += 1
            acc = live_bytes.setdefault(name, [0, 0])
            acc[0] += conn.bytes_client_to_upstream
            acc[1] += conn.bytes_upstream_to_client
            if conn.target is not None and conn.state is not ConnectionState.CONNECTING:
                upstream_active.setdefault(name, Counter())[conn.target.label] += 1
        out: dict[str, ListenerStats] = {}
        for name, totals in self._totals.items():
            c2u, u2c = live_bytes.get(name, (0, 0))
            out[name] = ListenerStats(
                name=name,
                active=active[name],
                accepted=totals.accepted,
                closed=dict(totals.closed),
                bytes={
                    Direction.CLIENT_TO_UPSTREAM: totals.bytes_c2u + c2u,
                    Direction.UPSTREAM_TO_CLIENT: totals.bytes_u2c + u2c,
                },
                flow_paused=dict(totals.flow_paused),
                duration=totals.duration.snapshot(),
                upstream_active=dict(upstream_active.get(name, {})),
            )
        return out


def snapshot_record(stats: ConnectionStats) -> dict[str, Any]:
    """The `/connections` fields a connection knows itself (SPEC section 4), from its snapshot;
    liveness is added by the watchdog."""
    return {
        "id": stats.id,
        "listener": stats.listener,
        "client": stats.client,
        "upstream": stats.upstream,
        "opened_at": rfc3339(stats.opened_wall),
        "age_s": round(stats.age, 3),
        "idle_s": round(stats.idle, 3),
        "bytes_client_to_upstream": stats.bytes_client_to_upstream,
        "bytes_upstream_to_client": stats.bytes_upstream_to_client,
        "state": _RECORD_STATE.get(stats.state, "open"),
    }


_RECORD_STATE = {
    ConnectionState.HALF_CLOSED: "half_closed",
    ConnectionState.CLOSING: "closing",
    ConnectionState.CLOSED: "closing",
}
