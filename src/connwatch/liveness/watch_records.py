"""What the watchdog keeps: per listener the beat counters (`ListenerTotals`: plain ints and
histograms, snapshotted at scrape time), per connection its record (`WatchRecord`, kept in
`conn.watch`: config, interval, failures, last verdict and both sockets)."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final

from connwatch._types import Liveness, Side, WatchedConnection
from connwatch.config import HeartbeatConfig
from connwatch.histogram import LATENCY_BUCKETS, Histogram
from connwatch.liveness.socket_leg import SideCounters, SocketLeg
from connwatch.liveness.verdicts import judge_by_bytes
from connwatch.snapshots import LivenessStats

__all__ = ["ListenerTotals", "WatchRecord"]

_SIDES: Final = (Side.CLIENT, Side.UPSTREAM)
# The config of a record whose listener's config had not reached the watchdog yet (identity
# tells it, no flag: a record is 112 bytes with 10 slots, 128 with 11 or 12).
_UNCONFIGURED: Final = HeartbeatConfig()


class ListenerTotals:
    """One listener's config and counters: plain ints, snapshotted at scrape time."""

    __slots__ = (
        "config",
        "failed",
        "lazy",
        "ok",
        "promotion",
        "quiet",
        "retransmits",
        "rtt",
        "sides",
        "states",
        "unbeaten",
        "waiting",
    )

    def __init__(self, config: HeartbeatConfig | None) -> None:
        self.config = config
        # Heartbeats on: a connection watched now waits for its record (`waiting`). A plain
        # slot read at every watch, not `config.enabled` through pydantic's attribute hook.
        self.lazy = config is not None and config.enabled
        self.ok = 0
        self.failed = 0
        self.rtt = {side: Histogram(LATENCY_BUCKETS) for side in _SIDES}
        self.retransmits = dict.fromkeys(_SIDES, 0)
        self.sides = {side: SideCounters(side, self.rtt[side], self.retransmits) for side in _SIDES}
        # Connections with a beating record, by last verdict: a plain dict with every state
        # (zero too, as the snapshot reports them), not a Counter (a dict subclass's generic
        # subscript and store). Those still `waiting` are counted at scrape time.
        self.states: dict[Liveness, int] = dict.fromkeys(Liveness, 0)
        # No set of every record: a beating record is in the watchdog's timer wheel and in its
        # connection's `watch`, which is all it needs (a set entry was ~65 bytes a connection).
        self.unbeaten: set[WatchRecord] = set()  # not configured yet
        # Watched with heartbeats off: no record, `conn.watch` is the config (see `snapshot`).
        self.quiet: set[WatchedConnection] = set()
        # Watched, no record yet (`conn.watch` is when it was watched), in the order watched;
        # those closed since are skipped. The watchdog's timer makes their records.
        self.waiting: deque[WatchedConnection] = deque()
        self.promotion: asyncio.TimerHandle | None = None

    def configure(self, config: HeartbeatConfig) -> None:
        self.config = config
        self.lazy = config.enabled

    def add(self, rec: WatchRecord) -> None:
        if rec.beating:
            self.states[rec.liveness] += 1
        else:
            self.unbeaten.add(rec)

    def remove(self, rec: WatchRecord) -> None:
        if rec in self.unbeaten:
            self.unbeaten.discard(rec)
        else:
            self.states[rec.liveness] -= 1

    def snapshot(self, name: str, now: float) -> LivenessStats:
        states = self.states.copy()
        # Watched, no record yet: `ok` (a new record's liveness); the closed ones are skipped.
        states[Liveness.OK] += sum(1 for conn in self.waiting if isinstance(conn.watch, float))
        if self.unbeaten or self.quiet:
            # No beats to judge these by: count what their byte counters show (no system calls).
            for rec in self.unbeaten:
                states[judge_by_bytes(rec.conn, rec.config, now)] += 1
            for conn in self.quiet:
                config = conn.watch
                assert isinstance(config, HeartbeatConfig)
                states[judge_by_bytes(conn, config, now)] += 1
        return LivenessStats(
            listener=name,
            heartbeats={"ok": self.ok, "failed": self.failed},
            rtt={str(side): h.snapshot() for side, h in self.rtt.items()},
            retransmits={str(side): n for side, n in self.retransmits.items()},
            states={str(state): states.get(state, 0) for state in Liveness},
        )


class WatchRecord:
    """The watchdog's state for one connection (kept in `conn.watch`)."""

    __slots__ = (
        "client",
        "config",
        "conn",
        "failures",
        "interval",
        "liveness",
        "max_interval",
        "slot",
        "totals",
        "upstream",
    )

    def __init__(self, conn: WatchedConnection, totals: ListenerTotals, now: float) -> None:
        self.conn = conn
        self.totals = totals
        self.adopt(totals.config or _UNCONFIGURED)
        self.failures = 0
        self.liveness = Liveness.OK
        self.slot = 0  # the timer wheel's slot this record is due in; 0 while not scheduled
        sides = totals.sides
        self.client = SocketLeg(sides[Side.CLIENT], conn.client_leg.transport, now)
        self.upstream = SocketLeg(sides[Side.UPSTREAM], conn.upstream_leg.transport, now)

    def adopt(self, config: HeartbeatConfig) -> None:
        self.config = config
        self.interval = config.interval
        # Read at every beat: a plain slot, where a pydantic model's attribute goes through
        # its __getattr__ hook.
        self.max_interval = config.max_interval

    @property
    def configured(self) -> bool:
        """Whether its listener's config had reached the watchdog (`adopt` makes it so)."""
        return self.config is not _UNCONFIGURED

    @property
    def beating(self) -> bool:
        return self.config is not _UNCONFIGURED and self.config.enabled

    def release(self) -> None:
        self.slot = 0
        self.client.release()
        self.upstream.release()
