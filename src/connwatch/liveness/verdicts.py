"""The watchdog's judgements, as pure functions of TCP_INFO, the connection and the clock.

`judge` classifies one beat of a connection (SPEC section 5, the precedence in
`liveness.watchdog`); `judge_by_bytes` does it from the byte counts alone (no heartbeats);
`socket_errors` and `reason_for` name the close reason of a failed connection; `tcp_figures` and
`failure_figures` are what `/connections` and the `heartbeat_failed` line show of a socket.
Only `track_progress` writes: the ACK progress it remembers on the leg.
"""

from __future__ import annotations

import select
import socket
from typing import Any, Final, Protocol

from connwatch._types import CloseReason, Liveness, Side, SocketLike, WatchedConnection
from connwatch.config import HeartbeatConfig
from connwatch.exceptions import reason_for_errno
from connwatch.liveness.socket_leg import SocketLeg
from connwatch.liveness.tcp_info import (
    CORE_ACKED,
    CORE_LAST_ACK_MS,
    CORE_LAST_SENT_MS,
    CORE_NOTSENT,
    CORE_PROBES,
    CORE_RTT_US,
    CORE_SND_WND,
    CORE_STATE,
    CORE_TOTAL_RETRANS,
    CORE_UNACKED,
    TcpCore,
    read_tcp_core,
    read_tcp_info,
)

__all__ = [
    "Legs",
    "Verdict",
    "failure_figures",
    "judge",
    "judge_by_bytes",
    "read_core",
    "reason_for",
    "socket_errors",
    "tcp_figures",
]

_MIN_DEAD_PROBES: Final = 2  # unanswered zero-window probes before the silence can count
# Linux TCP states (include/net/tcp_states.h) in which a leg can still carry data one way or the
# other: ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING. CLOSE means the kernel
# dropped the connection (timeout, reset) and TIME_WAIT that both sides are done: neither belongs
# under an open proxied connection.
_CARRYING: Final = frozenset({1, 4, 5, 8, 9, 11})
_CLOSE: Final = 7
_STALLED: Final = "stalled"  # the `cause` of a failed beat in the heartbeat_failed line
_SOCKET_STATE: Final = "socket_state"


class Legs(Protocol):
    """Both sockets of a watched connection (`watch_records.WatchRecord` has them)."""

    client: SocketLeg
    upstream: SocketLeg


class Verdict:
    """The outcome of judging one beat."""

    __slots__ = ("cause", "failed_sides", "liveness", "recheck_at")

    def __init__(self) -> None:
        self.liveness = Liveness.OK
        self.cause: str | None = None  # why the beat failed: "stalled" or "socket_state"
        self.failed_sides: list[Side] = []
        self.recheck_at = float("inf")  # when an ongoing stall would reach stall_timeout


# -- closing a failed connection ----------------------------------------------------------------
def socket_errors(legs: Legs, verdict: Verdict) -> dict[Side, int]:
    """The pending errors (SO_ERROR) of legs the kernel has dropped, e.g. ETIMEDOUT after
    keep-alive probes or TCP_USER_TIMEOUT, ECONNRESET after a RST. The event loop never saw
    them because it was not polling those sockets (reading paused, nothing to write)."""
    if verdict.cause != _SOCKET_STATE:
        return {}
    errors: dict[Side, int] = {}
    for side in verdict.failed_sides:
        sock = (legs.client if side is Side.CLIENT else legs.upstream).sock
        if sock is None:
            continue
        try:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            continue
        if error:
            errors[side] = error
    return errors


def reason_for(errors: dict[Side, int]) -> CloseReason:
    """SPEC section 8: a kernel keep-alive or user-timeout failure is `keepalive_timeout` and a
    reset names its side, whoever noticed it; otherwise the watchdog's own `heartbeat_failed`."""
    for side, error in errors.items():
        reason = reason_for_errno(side, error)
        if reason is not CloseReason.ERROR:
            return reason
    return CloseReason.HEARTBEAT_FAILED


# -- reading and judging ------------------------------------------------------------------------
def read_core(sock: SocketLike | None) -> TcpCore | None:
    """TCP_INFO through the connection's own socket object (describe; not the hot path)."""
    return None if sock is None else read_tcp_core(sock)


def judge(
    conn: WatchedConnection,
    config: HeartbeatConfig,
    now: float,
    client: TcpCore | None,
    upstream: TcpCore | None,
    legs: Legs | None,
) -> Verdict:
    """Classify a connection; with `legs`, ACK progress is tracked across beats."""
    verdict = Verdict()
    zero_window = False
    for side, core in ((Side.CLIENT, client), (Side.UPSTREAM, upstream)):
        if core is None:
            continue
        leg = None if legs is None else (legs.client if side is Side.CLIENT else legs.upstream)
        state = judge_leg(core, leg, now, config, conn, side, verdict)
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


def judge_leg(
    core: TcpCore,
    leg: SocketLeg | None,
    now: float,
    config: HeartbeatConfig,
    conn: WatchedConnection,
    side: Side,
    verdict: Verdict,
) -> Liveness | None:
    """One socket: STALLED or FAILING (a failed beat), ZERO_WINDOW, or None (fine)."""
    state = core[CORE_STATE]
    if state not in _CARRYING:
        if state == _CLOSE and not has_error(leg, conn, side):
            # FINs went both ways and the kernel handed the connection to a time-wait socket:
            # a clean end, with maybe a reply still queued behind paused reading. Not a failure.
            return None
        return Liveness.FAILING
    stall_ms = config.stall_timeout * 1000
    unacked = core[CORE_UNACKED]
    if window_closed(core) and (core[CORE_NOTSENT] > 0 or held_for(conn, side)):
        # Window probes carry no new data (unacked stays 0) and `probes` counts those not
        # answered since the last ACK: a live reader answers them, however long it stays full.
        dead = core[CORE_PROBES] >= _MIN_DEAD_PROBES and core[CORE_LAST_ACK_MS] >= stall_ms
        return Liveness.STALLED if dead else Liveness.ZERO_WINDOW
    if leg is None:  # no history: only the kernel's "time since the last ACK" to go on
        return Liveness.STALLED if unacked and core[CORE_LAST_ACK_MS] >= stall_ms else None
    stalled_for = track_progress(leg, core, now)
    if not unacked:
        return None
    # Both must hold: no new byte acknowledged, and no ACK of any kind (a duplicate ACK still
    # proves the peer alive) for stall_timeout.
    if stalled_for >= config.stall_timeout and core[CORE_LAST_ACK_MS] >= stall_ms:
        return Liveness.STALLED
    verdict.recheck_at = min(verdict.recheck_at, leg.progress_at + config.stall_timeout)
    return None


def track_progress(leg: SocketLeg, core: TcpCore, now: float) -> float:
    """Update when ACKs last made progress on this socket; returns seconds since then."""
    acked = core[CORE_ACKED]
    unacked = core[CORE_UNACKED]
    if not unacked:
        leg.progress_at = now
    elif acked < 0 or acked != leg.acked:
        # Progress since the last beat: the newest ACK (last_ack_recv ago) is the best estimate.
        leg.progress_at = now - core[CORE_LAST_ACK_MS] / 1000
    elif not leg.in_flight:
        # Nothing was in flight at the last beat, so the stall began after it and no earlier
        # than the newest send. Underestimating only delays a verdict, never fails one early.
        leg.progress_at = max(leg.progress_at, now - core[CORE_LAST_SENT_MS] / 1000)
    leg.acked = acked
    leg.in_flight = unacked > 0
    return now - leg.progress_at


def has_error(leg: SocketLeg | None, conn: WatchedConnection, side: Side) -> bool:
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


def window_closed(core: TcpCore) -> bool:
    snd_wnd = core[CORE_SND_WND]
    if snd_wnd >= 0:
        return snd_wnd == 0
    # Before Linux 5.4 there is no snd_wnd: window probing shows as probes with nothing in
    # flight (keep-alive probes look the same, but they only run when nothing is held).
    return core[CORE_PROBES] > 0 and not core[CORE_UNACKED]


def held_for(conn: WatchedConnection, side: Side) -> int:
    """Bytes connwatch holds in user space for this side's peer (not yet in the kernel)."""
    return (conn.client_leg if side is Side.CLIENT else conn.upstream_leg).write_buffer


def judge_by_bytes(conn: WatchedConnection, config: HeartbeatConfig, now: float) -> Liveness:
    if conn.half_closed:
        return Liveness.HALF_CLOSED
    return Liveness.IDLE if conn.idle(now) > config.max_interval else Liveness.OK


# -- what /connections and the heartbeat_failed line show ---------------------------------------
def tcp_figures(core: TcpCore | None) -> dict[str, Any] | None:
    if core is None:
        return None
    return {
        "rtt_ms": round(core[CORE_RTT_US] / 1000, 3),
        "retransmits": core[CORE_TOTAL_RETRANS],
        "unacked": core[CORE_UNACKED],
    }


def failure_figures(sock: SocketLike | None, leg: SocketLeg, now: float) -> dict[str, Any] | None:
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
