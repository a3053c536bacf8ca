"""The per-connection liveness watchdog: heartbeats judged from the kernel's TCP_INFO.

At each beat the watchdog reads TCP_INFO of both legs of a connection and classifies it (SPEC
section 5), in this order of precedence:

- `stalled`: bytes in flight (unacked > 0) with no ACK progress for `stall_timeout`, or a zero
  window whose probes have gone unanswered that long. A failed beat.
- `failing`: a socket no longer in a data-carrying state (e.g. CLOSE after the kernel dropped it
  while the loop was not polling it because reading was paused). A failed beat.
- `zero_window`: the peer advertises a zero receive window (snd_wnd == 0) while we hold data
  for it, and it still answers window probes. Alive: slow, not dead.
- `half_closed`: one direction has ended.
- `idle`: no byte either way for longer than one `max_interval`.
- `ok`: everything else.

After `failure_threshold` consecutive failed beats both legs are aborted and one
`heartbeat_failed` line logs the figures that failed it. The close reason is `heartbeat_failed`,
unless a dropped socket's pending error (SO_ERROR) names the kernel's reason: ETIMEDOUT after
keep-alive or TCP_USER_TIMEOUT is `keepalive_timeout`, a reset `client_reset`/`upstream_reset`
(SPEC section 8). The loop does not poll a leg whose reading is paused and that has nothing to
write, so only the watchdog sees such a socket die. Intervals
adapt (SPEC section 8): x1.5 per passing beat up to `max_interval`, back to `interval` on a failed
beat or a change of liveness state. While bytes sit unacknowledged, the next beat is pulled
forward to the moment the stall would reach `stall_timeout`, so once a stall is under way a long
adaptive interval does not add itself to the detection time.

One scheduler serves every connection of the process (`timer_wheel.TimerWheel`): beats due
within one tick (10 ms) run in one wake-up. At a beat each socket gives six TCP_INFO fields
(`SocketLeg.beat`); a connection whose sockets are plainly fine is settled without `judge`, and
the full `TcpInfo` is read only for a failure's log line. The judging itself is in `verdicts`,
the per-listener counters and per-connection records in `watch_records`, the per-socket state
in `socket_leg`.
"""

from __future__ import annotations

import asyncio
import errno
import time
from typing import TYPE_CHECKING, Any, Final

import structlog

from connwatch._types import Clock, ConnectionState, Liveness, WatchedConnection
from connwatch.config import HeartbeatConfig
from connwatch.liveness.tcp_info import TcpCore
from connwatch.liveness.timer_wheel import TimerWheel
from connwatch.liveness.verdicts import (
    Verdict,
    failure_figures,
    judge,
    read_core,
    reason_for,
    socket_errors,
    tcp_figures,
)
from connwatch.liveness.watch_records import ListenerTotals, WatchRecord
from connwatch.snapshots import LivenessStats

if TYPE_CHECKING:
    from connwatch.config import ListenerConfig

__all__ = ["Watchdog"]

log = structlog.get_logger("connwatch.watchdog")

_GROWTH: Final = 1.5  # SPEC section 8
_EARLY_MIN: Final = 0.005  # seconds: the soonest a stall re-check is scheduled
_OPEN_STATES: Final = (ConnectionState.OPEN, ConnectionState.HALF_CLOSED)
# The plain beat's verdicts as module constants: on Python 3.11 `Liveness.OK` is a ~0.2 µs
# lookup through the enum's metaclass, a global is ~15 ns.
_OK: Final = Liveness.OK
_IDLE: Final = Liveness.IDLE
_HALF_CLOSED: Final = Liveness.HALF_CLOSED
# Seconds: records are made this long before their first beat, a batch a timer callback.
_PROMOTE_AHEAD: Final = 0.1


class Watchdog:
    """Heartbeats for every watched connection of one process (the daemon's `Liveness_`).

    `clock` is the monotonic clock liveness is judged by; connections stamp `last_activity` with
    `time.monotonic`, so a test clock must run on it (plus an offset it moves forward).
    """

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._totals: dict[str, ListenerTotals] = {}
        self._scheduler = TimerWheel(clock, self._beats)
        self._closed = False

    # -- the daemon's interface -----------------------------------------------------------------
    def configure(self, listener: str, config: ListenerConfig) -> None:
        """Set a listener's heartbeat config for connections watched from now on (open ones keep
        theirs, as a reload never changes an open connection)."""
        totals = self._totals.get(listener)
        if totals is None:
            totals = self._totals[listener] = ListenerTotals(config.heartbeat)
        self._promote(totals, until=None)  # the waiting ones keep the config they came with
        totals.configure(config.heartbeat)
        for rec in [r for r in totals.unbeaten if not r.configured]:
            # Accepted before the listener's config reached us: adopt it now.
            totals.remove(rec)
            rec.adopt(config.heartbeat)
            totals.add(rec)
            self._start(rec)

    def watch(self, conn: WatchedConnection) -> None:
        if self._closed or conn.watch is not None:
            return
        totals = self._totals.get(conn.listener)
        if totals is None:  # the listener accepted before configure() reached us
            totals = self._totals[conn.listener] = ListenerTotals(None)
        if totals.lazy:
            # No record until its first beat is near: most connections close before that. Till
            # then `conn.watch` is the time it was watched, and it counts as `ok` (a new
            # record's liveness) at scrape time (`ListenerTotals.snapshot`): a count kept here
            # was a dict `+=` on watch and a `-=` on unwatch, with a lookup of its totals
            # (~1.5k instructions a connection).
            conn.watch = self._clock()
            waiting = totals.waiting
            # Connections that closed while waiting go now, not at the next promotion: held
            # there, each closed connection (its legs, its transports) lived on for up to an
            # interval, and the garbage collector walked them all that time.
            while waiting and waiting[0].watch is None:
                waiting.popleft()
            if totals.promotion is None:  # (once an interval)
                assert totals.config is not None  # lazy: configured
                self._arm_promotion(totals, totals.config.interval)
            waiting.append(conn)
            return
        config = totals.config
        if config is not None:
            # Heartbeats off: nothing to beat, so no record (its two borrowed sockets were ~16k
            # instructions a connection). `conn.watch` is the config it was watched under; the
            # liveness counts judge it by its byte counts at scrape time.
            conn.watch = config
            totals.quiet.add(conn)
            return
        rec = WatchRecord(conn, totals, self._clock())
        conn.watch = rec
        totals.add(rec)
        self._start(rec)

    def unwatch(self, conn: WatchedConnection) -> None:
        rec = conn.watch
        if isinstance(rec, float):  # no beat was near yet (it stays in `waiting`, skipped)
            conn.watch = None
            return
        if isinstance(rec, WatchRecord):
            conn.watch = None
            rec.release()
            rec.totals.remove(rec)
        elif rec is not None:  # heartbeats off: the config it was watched under, no record
            conn.watch = None
            totals = self._totals.get(conn.listener)
            if totals is not None:
                totals.quiet.discard(conn)

    # -- records made when the first beat is near ----------------------------------------------
    def _record(self, conn: WatchedConnection) -> object | None:
        """`conn.watch`, its record made now if it was still waiting for one."""
        if isinstance(conn.watch, float):
            totals = self._totals.get(conn.listener)
            if totals is not None:
                self._adopt(conn, totals)
        return conn.watch

    def _adopt(self, conn: WatchedConnection, totals: ListenerTotals) -> None:
        """The record of a waiting connection, scheduled for the beat it was due at."""
        watched_at = conn.watch
        assert isinstance(watched_at, float)
        rec = WatchRecord(conn, totals, watched_at)
        conn.watch = rec
        totals.states[rec.liveness] += 1  # counted from `waiting` till now
        if not self._closed:
            self._scheduler.schedule(rec, watched_at + rec.interval)

    def _arm_promotion(self, totals: ListenerTotals, delay: float) -> None:
        loop = asyncio.get_running_loop()
        totals.promotion = loop.call_later(max(delay, _PROMOTE_AHEAD), self._promote_due, totals)

    def _promote_due(self, totals: ListenerTotals) -> None:
        totals.promotion = None
        if not self._closed:
            self._promote(totals, until=self._clock() + _PROMOTE_AHEAD)

    def _promote(self, totals: ListenerTotals, until: float | None) -> None:
        """Records for the waiting connections whose first beat is due by `until` (None: all);
        the timer set again for the next."""
        waiting = totals.waiting
        config = totals.config
        interval = 0.0 if config is None else config.interval
        while waiting:
            conn = waiting[0]
            watched_at = conn.watch
            if isinstance(watched_at, float):
                if until is not None and watched_at + interval > until:
                    if totals.promotion is None:
                        self._arm_promotion(totals, watched_at + interval - self._clock())
                    return
                self._adopt(conn, totals)
            waiting.popleft()
        if totals.promotion is not None:
            totals.promotion.cancel()
            totals.promotion = None

    def describe(self, conn: WatchedConnection) -> dict[str, Any]:
        """The `/connections` fields `liveness`, `heartbeat` and `tcp`, TCP figures read now."""
        client = read_core(conn.client_socket)
        upstream = read_core(conn.upstream_socket)
        rec = self._record(conn)
        tcp = None
        if client is not None or upstream is not None:
            tcp = {"client": tcp_figures(client), "upstream": tcp_figures(upstream)}
        interval: float | None = None
        if isinstance(rec, WatchRecord) and rec.beating:
            liveness, failures, interval = rec.liveness, rec.failures, rec.interval
        else:  # no beats: judge from what the kernel and the byte counts show right now
            if isinstance(rec, HeartbeatConfig):  # watched with heartbeats off
                config = rec
            else:
                config = rec.config if isinstance(rec, WatchRecord) else HeartbeatConfig()
            liveness = judge(conn, config, self._clock(), client, upstream, None).liveness
            failures = 0
        return {
            "liveness": str(liveness),
            "heartbeat": {
                "state": "failing" if failures else "ok",
                "failures": failures,
                "interval_s": None if interval is None else round(interval, 3),
            },
            "tcp": tcp,
        }

    def statistics(self) -> dict[str, LivenessStats]:
        now = self._clock()
        return {name: totals.snapshot(name, now) for name, totals in self._totals.items()}

    def close(self) -> None:
        """Stop every beat; the connections stay open (their owners close them)."""
        self._closed = True
        # Every beating record is due in the wheel (one whose connection is closing is not: its
        # borrowed sockets are let go when it is, `BorrowedSocket.__del__`).
        records = self._scheduler.pending()
        self._scheduler.close()
        for totals in self._totals.values():
            if totals.promotion is not None:
                totals.promotion.cancel()
                totals.promotion = None
            records.extend(totals.unbeaten)
        for rec in records:
            rec.release()

    # -- beats ----------------------------------------------------------------------------------
    def beat(self, conn: WatchedConnection) -> Liveness | None:
        """Run one beat of `conn` now (the scheduler's work; tests call it directly).

        Returns the liveness judged; None when the connection is not watched, not configured
        yet or not open.
        """
        rec = self._record(conn)
        if not isinstance(rec, WatchRecord) or not rec.beating or self._closed:
            return None
        if conn.state not in _OPEN_STATES:
            return None
        rec.slot = 0  # not scheduled: an entry of it left in the wheel is skipped
        return self._beat(rec, self._clock())

    def _start(self, rec: WatchRecord) -> None:
        if rec.beating and not self._closed:
            self._scheduler.schedule(rec, self._clock() + rec.interval)

    def _beats(self, ready: list[WatchRecord], now: float) -> None:
        beat = self._beat
        for rec in ready:
            conn = rec.conn
            if conn.watch is rec and conn.state in _OPEN_STATES:
                beat(rec, now)

    def _beat(self, rec: WatchRecord, now: float) -> Liveness:
        # A leg gives its TCP_INFO fields only when they need judging; None when plainly fine.
        client = rec.client.beat(now)
        upstream = rec.upstream.beat(now)
        if client is not None or upstream is not None:
            return self._judge(rec, now, client, upstream)
        # The common case, kept to plain attribute work: every socket established, nothing in
        # flight, window open (what `judge` and `_passed` decide for it, without the calls).
        conn = rec.conn
        max_interval = rec.max_interval
        if conn.half_closed:
            liveness = _HALF_CLOSED
        elif now - conn.last_activity > max_interval:
            liveness = _IDLE
        else:
            liveness = _OK
        rec.totals.ok += 1
        rec.failures = 0
        if liveness is rec.liveness:
            interval = rec.interval * _GROWTH
            rec.interval = interval if interval < max_interval else max_interval
        else:
            self._change(rec, liveness)
        if not self._closed:
            self._scheduler.schedule(rec, now + rec.interval)
        return liveness

    def _judge(
        self, rec: WatchRecord, now: float, client: TcpCore | None, upstream: TcpCore | None
    ) -> Liveness:
        verdict = judge(rec.conn, rec.config, now, client, upstream, rec)
        if verdict.cause is None:
            self._passed(rec, verdict.liveness, now, verdict.recheck_at)
        else:
            self._failed(rec, verdict, now)
        return verdict.liveness

    def _passed(self, rec: WatchRecord, liveness: Liveness, now: float, recheck_at: float) -> None:
        rec.totals.ok += 1
        rec.failures = 0
        if liveness is rec.liveness:
            rec.interval = min(rec.interval * _GROWTH, rec.config.max_interval)
        else:
            self._change(rec, liveness)
        self._next(rec, now, recheck_at)

    def _failed(self, rec: WatchRecord, verdict: Verdict, now: float) -> None:
        rec.totals.failed += 1
        rec.failures += 1
        rec.interval = rec.config.interval
        if verdict.liveness is not rec.liveness:
            self._change(rec, verdict.liveness)
        if rec.failures >= rec.config.failure_threshold:
            self._fail(rec, verdict, now)
        else:
            self._next(rec, now, verdict.recheck_at)

    def _change(self, rec: WatchRecord, liveness: Liveness) -> None:
        states = rec.totals.states
        states[rec.liveness] -= 1
        states[liveness] += 1
        conn = rec.conn
        log.debug(
            "liveness_changed",
            conn_id=conn.id,
            listener=conn.listener,
            old=str(rec.liveness),
            new=str(liveness),
        )
        rec.liveness = liveness
        rec.interval = rec.config.interval

    def _next(self, rec: WatchRecord, now: float, recheck_at: float) -> None:
        if self._closed:
            return
        due = now + rec.interval
        if recheck_at < due:  # a stall under way: judge it when it reaches stall_timeout
            due = max(recheck_at, now + _EARLY_MIN)
        self._scheduler.schedule(rec, due)

    def _fail(self, rec: WatchRecord, verdict: Verdict, now: float) -> None:
        conn = rec.conn
        errors = socket_errors(rec, verdict)
        reason = reason_for(errors)
        log.warning(
            "heartbeat_failed",
            conn_id=conn.id,
            listener=conn.listener,
            client=conn.client,
            upstream=conn.upstream,
            cause=verdict.cause,
            sides=[str(side) for side in verdict.failed_sides],
            socket_errors={str(side): errno.errorcode.get(e, str(e)) for side, e in errors.items()},
            reason=str(reason),
            failures=rec.failures,
            failure_threshold=rec.config.failure_threshold,
            liveness=str(verdict.liveness),
            client_tcp=failure_figures(conn.client_socket, rec.client, now),
            upstream_tcp=failure_figures(conn.upstream_socket, rec.upstream, now),
        )
        # The peer is dead: a graceful close would only wait for a flush that cannot happen.
        conn.close(reason, abort=True)
