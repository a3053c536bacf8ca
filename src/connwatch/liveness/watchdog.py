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

One scheduler serves every connection of the process: a heap of due times behind one loop timer.
Beats due within one `_TICK` (10 ms) run in one wake-up, so 8,000 connections at a 1 s
interval cost ~100 timer callbacks a second, not 8,000. The hot path reads `read_tcp_core()` (a
plain tuple); the full `TcpInfo` is read only for a failure's log line.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import select
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import structlog

from connwatch._types import Clock, CloseReason, ConnectionState, Liveness, Side
from connwatch.config import HeartbeatConfig
from connwatch.exceptions import reason_for_errno
from connwatch.histogram import LATENCY_BUCKETS, Histogram
from connwatch.liveness.tcp_info import CORE_FIELDS, read_tcp_core, read_tcp_info
from connwatch.snapshots import LivenessStats

if TYPE_CHECKING:
    from connwatch.config import ListenerConfig
    from connwatch.proxy.connection import MonitoredConnection

__all__ = ["Watchdog"]

log = structlog.get_logger("connwatch.watchdog")

_TICK: Final = 0.01  # seconds: beats due within one tick run in one timer callback
_TIMER_SLACK: Final = 0.002  # seconds: loop timers (uvloop: whole ms) may fire this early
_NEVER: Final = 2**62
_GROWTH: Final = 1.5  # SPEC section 8
_EARLY_MIN: Final = 0.005  # seconds: the soonest a stall re-check is scheduled
_MIN_DEAD_PROBES: Final = 2  # unanswered zero-window probes before the silence can count
# Linux TCP states (include/net/tcp_states.h) in which a leg can still carry data one way or the
# other: ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING. CLOSE means the kernel
# dropped the connection (timeout, reset) and TIME_WAIT that both sides are done: neither belongs
# under an open proxied connection.
_CARRYING: Final = frozenset({1, 4, 5, 8, 9, 11})
_ESTABLISHED: Final = 1
_CLOSE: Final = 7
_STALLED: Final = "stalled"  # the `cause` of a failed beat in the heartbeat_failed line
_SOCKET_STATE: Final = "socket_state"
_OPEN_STATES: Final = (ConnectionState.OPEN, ConnectionState.HALF_CLOSED)
_SIDES: Final = (Side.CLIENT, Side.UPSTREAM)
_TCP_FAMILIES: Final = frozenset({socket.AF_INET, socket.AF_INET6})

# Positions in read_tcp_core()'s tuple; -1 there means "this kernel does not report it".
_STATE: Final = CORE_FIELDS.index("state")
_PROBES: Final = CORE_FIELDS.index("probes")
_UNACKED: Final = CORE_FIELDS.index("unacked")
_RTT_US: Final = CORE_FIELDS.index("rtt_us")
_LAST_SENT_MS: Final = CORE_FIELDS.index("last_data_sent_ms")
_LAST_ACK_MS: Final = CORE_FIELDS.index("last_ack_recv_ms")
_TOTAL_RETRANS: Final = CORE_FIELDS.index("total_retrans")
_NOTSENT: Final = CORE_FIELDS.index("notsent_bytes")
_SND_WND: Final = CORE_FIELDS.index("snd_wnd")
_ACKED: Final = CORE_FIELDS.index("bytes_acked")

Core = tuple[int, ...]


class _Borrowed(socket.socket):
    """A socket object over a file descriptor its transport owns: for getsockopt only.

    Reading TCP_INFO through it costs about half of going through uvloop's pseudo-socket, which
    wraps its fd in a new `socket.socket` for every call. It never closes the fd, not even when
    garbage-collected without `detach()`: closing would pull the socket from under the transport.
    """

    __slots__ = ()

    def __del__(self) -> None:
        self.detach()


def _borrow(transport: asyncio.BaseTransport | None) -> socket.socket | None:
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None or sock.family not in _TCP_FAMILIES:
        return None  # Unix socket legs have no TCP_INFO: the byte counts are all we judge by
    if type(sock) is socket.socket:
        return sock  # the splice path's own socket object: read it directly
    fd = sock.fileno()
    return None if fd < 0 else _Borrowed(sock.family, sock.type, sock.proto, fd)


class _Leg:
    """One socket of a watched connection, and what the watchdog remembers of it between beats."""

    __slots__ = (
        "_sock",
        "acked",
        "borrowed",
        "in_flight",
        "progress_at",
        "retrans",
        "retransmits",
        "rtt",
        "side",
        "transport",
    )

    def __init__(
        self, side: Side, transport: asyncio.BaseTransport | None, totals: _Totals, now: float
    ) -> None:
        self.side = side
        self.transport = transport
        self._sock: socket.socket | None = None
        self.borrowed = False  # _sock looked up (once, at the first beat)
        self.rtt = totals.rtt[side]
        self.retransmits = totals.retransmits
        self.retrans = 0  # total_retrans already added to the listener's counter
        self.acked = -1  # bytes_acked at the last beat
        self.in_flight = False  # unacked > 0 at the last beat
        self.progress_at = now  # when ACKs last made progress (or nothing was in flight)

    @property
    def sock(self) -> socket.socket | None:
        """The socket to read TCP_INFO from, looked up at the first beat, not when the watch
        starts: on a churning service most connections end before their first beat."""
        if not self.borrowed:
            self.borrowed = True
            self._sock = _borrow(self.transport)
        return self._sock

    def read(self) -> Core | None:
        transport = self.transport
        # A closing transport may already have closed the fd, whose number the next accept can
        # reuse: never read through a borrowed fd once its owner is closing.
        if transport is None or transport.is_closing():
            return None
        sock = self.sock
        return None if sock is None else read_tcp_core(sock)

    def observe(self, core: Core, now: float) -> bool:
        """Count RTT and retransmits (SPEC section 8); True when the socket is plainly fine:
        established, nothing in flight, window open. Anything else needs `_judge`."""
        self.rtt.observe(core[_RTT_US] / 1e6)
        total = core[_TOTAL_RETRANS]
        if total > self.retrans:
            self.retransmits[self.side] += total - self.retrans
            self.retrans = total
        if core[_STATE] == _ESTABLISHED and not core[_UNACKED] and core[_SND_WND] > 0:
            self.progress_at = now
            self.acked = core[_ACKED]
            self.in_flight = False
            return True
        return False

    def release(self) -> None:
        if isinstance(self._sock, _Borrowed):
            self._sock.detach()
        self._sock = None
        self.borrowed = True


class _Totals:
    """One listener's config and counters: plain ints, snapshotted at scrape time."""

    __slots__ = (
        "config",
        "failed",
        "members",
        "ok",
        "retransmits",
        "rtt",
        "states",
        "unbeaten",
    )

    def __init__(self, config: HeartbeatConfig | None) -> None:
        self.config = config
        self.ok = 0
        self.failed = 0
        self.rtt = {side: Histogram(LATENCY_BUCKETS) for side in _SIDES}
        self.retransmits = dict.fromkeys(_SIDES, 0)
        self.states: Counter[Liveness] = Counter()  # connections with beats, by last verdict
        self.members: set[_Record] = set()
        self.unbeaten: set[_Record] = set()  # heartbeats off, or not configured yet

    def add(self, rec: _Record) -> None:
        self.members.add(rec)
        if rec.beating:
            self.states[rec.liveness] += 1
        else:
            self.unbeaten.add(rec)

    def remove(self, rec: _Record) -> None:
        self.members.discard(rec)
        if rec in self.unbeaten:
            self.unbeaten.discard(rec)
        else:
            self.states[rec.liveness] -= 1

    def snapshot(self, name: str, now: float) -> LivenessStats:
        states = self.states
        if self.unbeaten:
            # No beats to judge these by: count what their byte counters show (no system calls).
            states = states.copy()
            states.update(_judge_by_bytes(r.conn, r.config, now) for r in self.unbeaten)
        return LivenessStats(
            listener=name,
            heartbeats={"ok": self.ok, "failed": self.failed},
            rtt={str(side): h.snapshot() for side, h in self.rtt.items()},
            retransmits={str(side): n for side, n in self.retransmits.items()},
            states={str(state): states.get(state, 0) for state in Liveness},
        )


class _Record:
    """The watchdog's state for one connection (kept in `conn.watch`)."""

    __slots__ = (
        "client",
        "config",
        "configured",
        "conn",
        "failures",
        "interval",
        "liveness",
        "scheduled",
        "slot",
        "totals",
        "upstream",
    )

    def __init__(self, conn: MonitoredConnection, totals: _Totals, now: float) -> None:
        self.conn = conn
        self.totals = totals
        self.configured = totals.config is not None
        self.config = totals.config or HeartbeatConfig()
        self.interval = self.config.interval
        self.failures = 0
        self.liveness = Liveness.OK
        self.slot = 0
        self.scheduled = False
        self.client = _Leg(Side.CLIENT, conn.client_leg.transport, totals, now)
        self.upstream = _Leg(Side.UPSTREAM, conn.upstream_leg.transport, totals, now)

    @property
    def beating(self) -> bool:
        return self.configured and self.config.enabled

    def release(self) -> None:
        self.scheduled = False
        self.client.release()
        self.upstream.release()


class _Verdict:
    """The outcome of judging one beat."""

    __slots__ = ("cause", "failed_sides", "liveness", "recheck_at")

    def __init__(self) -> None:
        self.liveness = Liveness.OK
        self.cause: str | None = None  # why the beat failed: "stalled" or "socket_state"
        self.failed_sides: list[Side] = []
        self.recheck_at = float("inf")  # when an ongoing stall would reach stall_timeout


class _Wheel:
    """Beats bucketed into `_TICK`-wide slots of due time, served by one loop timer.

    Scheduling is a dict lookup and a list append; only a slot's first beat touches the heap of
    slot numbers. A record rescheduled or unwatched leaves a stale entry in its old slot, skipped
    when that slot runs (its `slot` no longer matches, or it is no longer `scheduled`).
    """

    def __init__(self, clock: Clock, fire: Callable[[list[_Record], float], None]) -> None:
        self._clock = clock
        self._fire = fire
        self._slots: dict[int, list[_Record]] = {}
        self._order: list[int] = []  # heap of the slot numbers in _slots
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = _NEVER

    def schedule(self, rec: _Record, due: float) -> None:
        slot = int(due / _TICK) + 1  # rounded up: a beat may run up to one tick late, never early
        rec.slot = slot
        rec.scheduled = True
        bucket = self._slots.get(slot)
        if bucket is not None:
            bucket.append(rec)
            return
        self._slots[slot] = [rec]
        heapq.heappush(self._order, slot)
        if slot < self._timer_slot:
            self._arm(slot)

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, slot * _TICK - self._clock()), self._run)
        self._timer_slot = slot

    def _run(self) -> None:
        self._timer = None
        self._timer_slot = _NEVER
        now = self._clock()
        last = int((now + _TIMER_SLACK) / _TICK)  # timers may round their delay down by a little
        order = self._order
        ready: list[_Record] = []
        while order and order[0] <= last:
            slot = heapq.heappop(order)
            for rec in self._slots.pop(slot):
                if rec.scheduled and rec.slot == slot:
                    rec.scheduled = False
                    ready.append(rec)
        try:
            self._fire(ready, now)
        finally:
            if order and self._timer is None:
                self._arm(order[0])

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_slot = _NEVER
        for bucket in self._slots.values():
            for rec in bucket:
                rec.scheduled = False
        self._slots.clear()
        self._order.clear()


class Watchdog:
    """Heartbeats for every watched connection of one process (the daemon's `Liveness_`).

    `clock` is the monotonic clock liveness is judged by; connections stamp `last_activity` with
    `time.monotonic`, so a test clock must run on it (plus an offset it moves forward).
    """

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._totals: dict[str, _Totals] = {}
        self._scheduler = _Wheel(clock, self._beats)
        self._closed = False

    # -- the daemon's interface -----------------------------------------------------------------
    def configure(self, listener: str, config: ListenerConfig) -> None:
        """Set a listener's heartbeat config for connections watched from now on (open ones keep
        theirs, as a reload never changes an open connection)."""
        totals = self._totals.get(listener)
        if totals is None:
            totals = self._totals[listener] = _Totals(config.heartbeat)
        totals.config = config.heartbeat
        for rec in [r for r in totals.unbeaten if not r.configured]:
            # Accepted before the listener's config reached us: adopt it now.
            totals.remove(rec)
            rec.configured = True
            rec.config = config.heartbeat
            rec.interval = config.heartbeat.interval
            totals.add(rec)
            self._start(rec)

    def watch(self, conn: MonitoredConnection) -> None:
        if self._closed or conn.watch is not None:
            return
        totals = self._totals.get(conn.listener)
        if totals is None:  # the listener accepted before configure() reached us
            totals = self._totals[conn.listener] = _Totals(None)
        rec = _Record(conn, totals, self._clock())
        conn.watch = rec
        totals.add(rec)
        self._start(rec)

    def unwatch(self, conn: MonitoredConnection) -> None:
        rec = conn.watch
        if not isinstance(rec, _Record):
            return
        conn.watch = None
        rec.release()
        rec.totals.remove(rec)

    def describe(self, conn: MonitoredConnection) -> dict[str, Any]:
        """The `/connections` fields `liveness`, `heartbeat` and `tcp`, TCP figures read now."""
        client = _read(conn.client_socket)
        upstream = _read(conn.upstream_socket)
        rec = conn.watch
        tcp = None
        if client is not None or upstream is not None:
            tcp = {"client": _tcp_figures(client), "upstream": _tcp_figures(upstream)}
        interval: float | None = None
        if isinstance(rec, _Record) and rec.beating:
            liveness, failures, interval = rec.liveness, rec.failures, rec.interval
        else:  # no beats: judge from what the kernel and the byte counts show right now
            config = rec.config if isinstance(rec, _Record) else HeartbeatConfig()
            liveness = _judge(conn, config, self._clock(), client, upstream, None).liveness
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
        self._scheduler.close()
        for totals in self._totals.values():
            for rec in totals.members:
                rec.release()

    # -- beats ----------------------------------------------------------------------------------
    def beat(self, conn: MonitoredConnection) -> Liveness | None:
        """Run one beat of `conn` now (the scheduler's work; tests call it directly).

        Returns the liveness judged; None when the connection is not watched, not configured
        yet or not open.
        """
        rec = conn.watch
        if not isinstance(rec, _Record) or not rec.beating or self._closed:
            return None
        if conn.state not in _OPEN_STATES:
            return None
        rec.scheduled = False
        return self._beat(rec, self._clock())

    def _start(self, rec: _Record) -> None:
        if rec.beating and not self._closed:
            self._scheduler.schedule(rec, self._clock() + rec.interval)

    def _beats(self, ready: list[_Record], now: float) -> None:
        for rec in ready:
            conn = rec.conn
            if conn.watch is rec and conn.state in _OPEN_STATES:
                self._beat(rec, now)

    def _beat(self, rec: _Record, now: float) -> Liveness:
        conn = rec.conn
        config = rec.config
        client = rec.client.read()
        upstream = rec.upstream.read()
        # Fast path, the common case: every socket established, nothing in flight, window open.
        plain = client is None or rec.client.observe(client, now)
        plain = (upstream is None or rec.upstream.observe(upstream, now)) and plain
        if plain:
            if conn.half_closed:
                liveness = Liveness.HALF_CLOSED
            elif now - conn.last_activity > config.max_interval:
                liveness = Liveness.IDLE
            else:
                liveness = Liveness.OK
            self._passed(rec, liveness, now, _NEVER)
            return liveness
        verdict = _judge(conn, config, now, client, upstream, rec)
        if verdict.cause is None:
            self._passed(rec, verdict.liveness, now, verdict.recheck_at)
        else:
            self._failed(rec, verdict, now)
        return verdict.liveness

    def _passed(self, rec: _Record, liveness: Liveness, now: float, recheck_at: float) -> None:
        rec.totals.ok += 1
        rec.failures = 0
        if liveness is rec.liveness:
            rec.interval = min(rec.interval * _GROWTH, rec.config.max_interval)
        else:
            self._change(rec, liveness)
        self._next(rec, now, recheck_at)

    def _failed(self, rec: _Record, verdict: _Verdict, now: float) -> None:
        rec.totals.failed += 1
        rec.failures += 1
        rec.interval = rec.config.interval
        if verdict.liveness is not rec.liveness:
            self._change(rec, verdict.liveness)
        if rec.failures >= rec.config.failure_threshold:
            self._fail(rec, verdict, now)
        else:
            self._next(rec, now, verdict.recheck_at)

    def _change(self, rec: _Record, liveness: Liveness) -> None:
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

    def _next(self, rec: _Record, now: float, recheck_at: float) -> None:
        if self._closed:
            return
        due = now + rec.interval
        if recheck_at < due:  # a stall under way: judge it when it reaches stall_timeout
            due = max(recheck_at, now + _EARLY_MIN)
        self._scheduler.schedule(rec, due)

    def _fail(self, rec: _Record, verdict: _Verdict, now: float) -> None:
        conn = rec.conn
        errors = _socket_errors(rec, verdict)
        reason = _reason_for(errors)
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
            client_tcp=_failure_figures(conn.client_socket, rec.client, now),
            upstream_tcp=_failure_figures(conn.upstream_socket, rec.upstream, now),
        )
        # The peer is dead: a graceful close would only wait for a flush that cannot happen.
        conn.close(reason, abort=True)


def _socket_errors(rec: _Record, verdict: _Verdict) -> dict[Side, int]:
    """The pending errors (SO_ERROR) of legs the kernel has dropped, e.g. ETIMEDOUT after
    keep-alive probes or TCP_USER_TIMEOUT, ECONNRESET after a RST. The event loop never saw
    them because it was not polling those sockets (reading paused, nothing to write)."""
    if verdict.cause != _SOCKET_STATE:
        return {}
    errors: dict[Side, int] = {}
    for side in verdict.failed_sides:
        sock = (rec.client if side is Side.CLIENT else rec.upstream).sock
        if sock is None:
            continue
        try:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            continue
        if error:
            errors[side] = error
    return errors


def _reason_for(errors: dict[Side, int]) -> CloseReason:
    """SPEC section 8: a kernel keep-alive or user-timeout failure is `keepalive_timeout` and a
    reset names its side, whoever noticed it; otherwise the watchdog's own `heartbeat_failed`."""
    for side, error in errors.items():
        reason = reason_for_errno(side, error)
        if reason is not CloseReason.ERROR:
            return reason
    return CloseReason.HEARTBEAT_FAILED


# -- reading and judging ------------------------------------------------------------------------
def _read(sock: Any) -> Core | None:
    """TCP_INFO through the connection's own socket object (describe; not the hot path)."""
    return None if sock is None else read_tcp_core(sock)


def _judge(
    conn: MonitoredConnection,
    config: HeartbeatConfig,
    now: float,
    client: Core | None,
    upstream: Core | None,
    rec: _Record | None,
) -> _Verdict:
    """Classify a connection; with `rec`, ACK progress is tracked across beats."""
    verdict = _Verdict()
    zero_window = False
    for side, core in ((Side.CLIENT, client), (Side.UPSTREAM, upstream)):
        if core is None:
            continue
        leg = None if rec is None else (rec.client if side is Side.CLIENT else rec.upstream)
        state = _judge_leg(core, leg, now, config, conn, side, verdict)
        if state is None:
            continue
        if state is Liveness.ZERO_WINDOW:
            zero_window = True
            continue
        verdict.failed_sides.append(side)
        if verdict.cause is None or state is Liveness.STALLED:  # a stall names the verdict
            verdict.cause = _STALLED if state is Liveness.STALLED else _SOCKET_STATE
            verdict.liveness = state
    if verdict.cause is not None:
        return verdict
    if zero_window:
        verdict.liveness = Liveness.ZERO_WINDOW
    elif conn.half_closed:
        verdict.liveness = Liveness.HALF_CLOSED
    elif conn.idle(now) > config.max_interval:
        verdict.liveness = Liveness.IDLE
    return verdict


def _judge_leg(
    core: Core,
    leg: _Leg | None,
    now: float,
    config: HeartbeatConfig,
    conn: MonitoredConnection,
    side: Side,
    verdict: _Verdict,
) -> Liveness | None:
    """One socket: STALLED or FAILING (a failed beat), ZERO_WINDOW, or None (fine)."""
    state = core[_STATE]
    if state not in _CARRYING:
        if state == _CLOSE and not _has_error(leg, conn, side):
            # FINs went both ways and the kernel handed the connection to a time-wait socket:
            # a clean end, with maybe a reply still queued behind paused reading. Not a failure.
            return None
        return Liveness.FAILING
    stall_ms = config.stall_timeout * 1000
    unacked = core[_UNACKED]
    if _window_closed(core) and (core[_NOTSENT] > 0 or _held_for(conn, side)):
        # Window probes carry no new data (unacked stays 0) and `probes` counts those not
        # answered since the last ACK: a live reader answers them, however long it stays full.
        dead = core[_PROBES] >= _MIN_DEAD_PROBES and core[_LAST_ACK_MS] >= stall_ms
        return Liveness.STALLED if dead else Liveness.ZERO_WINDOW
    if leg is None:  # no history: only the kernel's "time since the last ACK" to go on
        return Liveness.STALLED if unacked and core[_LAST_ACK_MS] >= stall_ms else None
    stalled_for = _track_progress(leg, core, now)
    if not unacked:
        return None
    # Both must hold: no new byte acknowledged, and no ACK of any kind (a duplicate ACK still
    # proves the peer alive) for stall_timeout.
    if stalled_for >= config.stall_timeout and core[_LAST_ACK_MS] >= stall_ms:
        return Liveness.STALLED
    verdict.recheck_at = min(verdict.recheck_at, leg.progress_at + config.stall_timeout)
    return None


def _track_progress(leg: _Leg, core: Core, now: float) -> float:
    """Update when ACKs last made progress on this socket; returns seconds since then."""
    acked = core[_ACKED]
    unacked = core[_UNACKED]
    if not unacked:
        leg.progress_at = now
    elif acked < 0 or acked != leg.acked:
        # Progress since the last beat: the newest ACK (last_ack_recv ago) is the best estimate.
        leg.progress_at = now - core[_LAST_ACK_MS] / 1000
    elif not leg.in_flight:
        # Nothing was in flight at the last beat, so the stall began after it and no earlier
        # than the newest send. Underestimating only delays a verdict, never fails one early.
        leg.progress_at = max(leg.progress_at, now - core[_LAST_SENT_MS] / 1000)
    leg.acked = acked
    leg.in_flight = unacked > 0
    return now - leg.progress_at


def _has_error(leg: _Leg | None, conn: MonitoredConnection, side: Side) -> bool:
    """Whether the kernel holds an error for this socket (a reset, a keep-alive or user
    timeout). poll() reports POLLERR without consuming the error, as reading SO_ERROR would:
    the transport must still see it if it reads again before the watchdog acts."""
    sock = (
        leg.sock
        if leg is not None
        else (conn.client_socket, conn.upstream_socket)[side is Side.UPSTREAM]
    )
    fd = -1 if sock is None else sock.fileno()
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR is always reported, whatever is asked for
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _window_closed(core: Core) -> bool:
    snd_wnd = core[_SND_WND]
    if snd_wnd >= 0:
        return snd_wnd == 0
    # Before Linux 5.4 there is no snd_wnd: window probing shows as probes with nothing in
    # flight (keep-alive probes look the same, but they only run when nothing is held).
    return core[_PROBES] > 0 and not core[_UNACKED]


def _held_for(conn: MonitoredConnection, side: Side) -> int:
    """Bytes connwatch holds in user space for this side's peer (not yet in the kernel)."""
    return (conn.client_leg if side is Side.CLIENT else conn.upstream_leg).write_buffer


def _judge_by_bytes(conn: MonitoredConnection, config: HeartbeatConfig, now: float) -> Liveness:
    if conn.half_closed:
        return Liveness.HALF_CLOSED
    return Liveness.IDLE if conn.idle(now) > config.max_interval else Liveness.OK


def _tcp_figures(core: Core | None) -> dict[str, Any] | None:
    if core is None:
        return None
    return {
        "rtt_ms": round(core[_RTT_US] / 1000, 3),
        "retransmits": core[_TOTAL_RETRANS],
        "unacked": core[_UNACKED],
    }


def _failure_figures(sock: Any, leg: _Leg, now: float) -> dict[str, Any] | None:
    """The kernel's view of one leg for the heartbeat_failed line (full TCP_INFO, read now)."""
    info = None if sock is None else read_tcp_info(sock)
    if info is None:
        return None
    return {
        "state": info.state_name,
        "unacked": info.unacked,
        "retransmits": info.retransmits,
        "total_retrans": info.total_retrans,
        "probes": info.probes,
        "backoff": info.backoff,
        "rto_ms": round(info.rto_us / 1000, 3),
        "rtt_ms": round(info.rtt_us / 1000, 3),
        "last_ack_recv_ms": info.last_ack_recv_ms,
        "last_data_sent_ms": info.last_data_sent_ms,
        "last_data_recv_ms": info.last_data_recv_ms,
        "bytes_acked": info.bytes_acked,
        "notsent_bytes": info.notsent_bytes,
        "snd_wnd": info.snd_wnd,
        "no_ack_progress_s": round(now - leg.progress_at, 3) if info.unacked else 0.0,
    }
