"""MonitoredConnection: one proxied client stream, its lifecycle, close reason and timers.

Its two protocol legs (the per-chunk hot path), the shared read buffer and the limits live in
legs.py; this module wires them and decides when and why the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from connwatch._types import (
    CloseReason,
    ConnectionObserver,
    ConnectionState,
    Side,
    format_peer,
)
from connwatch.exceptions import reason_for_error
from connwatch.proxy.legs import Leg, ReadBuffer, Timeouts
from connwatch.snapshots import ConnectionStats

if TYPE_CHECKING:
    from connwatch.proxy.upstream import Target

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER {on, 0s}: close() sends RST, not FIN
_CLOSE_GRACE = 5.0  # seconds a graceful close may spend flushing before it is aborted
_QUIET_RETRY = 0.1  # seconds between looks for a quiet gap (max_lifetime)


# Enum members as module constants: on Python 3.11 `ConnectionState.OPEN` goes through the enum
# metaclass's attribute hook (~0.17 µs) against ~0.01 µs for a global; these are read several
# times for every connection.
_CONNECTING: Final = ConnectionState.CONNECTING
_OPEN: Final = ConnectionState.OPEN
_HALF_CLOSED: Final = ConnectionState.HALF_CLOSED
_CLOSING: Final = ConnectionState.CLOSING
_CLOSED: Final = ConnectionState.CLOSED
_CLIENT: Final = Side.CLIENT
_UPSTREAM: Final = Side.UPSTREAM
_ERROR: Final = CloseReason.ERROR
_CLIENT_CLOSED: Final = CloseReason.CLIENT_CLOSED
_UPSTREAM_CLOSED: Final = CloseReason.UPSTREAM_CLOSED
_Task: Final = asyncio.Task
SET_UP_TASK: Final = "connection-set-up"  # the name of a connection's set-up task


class MonitoredConnection:
    """One client stream proxied to one upstream target.

    Lifecycle: CONNECTING (client accepted, upstream connect under way) → OPEN → HALF_CLOSED (one
    direction ended) → CLOSING (we or the peers are closing) → CLOSED (both legs gone). Exactly one
    close reason is recorded; see `close()` and `reason` for which one wins.
    """

    __slots__ = (
        "_end_reason",
        "_pending",
        "_timer",
        "buffer",
        "client",
        "client_key",
        "client_leg",
        "closed_at",
        "connect_task",
        "id",
        "last_activity",
        "lifetime_deadline",
        "listener",
        "observer",
        "on_made",
        "opened_at",
        "opened_wall",
        "preamble",
        "reason",
        "state",
        "target",
        "timeouts",
        "upstream_leg",
        "watch",
    )

    def __init__(
        self,
        conn_id: str,
        listener: str,
        buffer: ReadBuffer,
        observer: ConnectionObserver[MonitoredConnection],
        timeouts: Timeouts,
    ) -> None:
        self.id = conn_id
        self.listener = listener
        self.buffer = buffer
        self.observer = observer
        self.timeouts = timeouts
        self.client = ""
        self.client_key: str | None = None  # holds a slot of its listener's client limits
        self.target: Target | None = None
        self.client_leg = Leg(self)
        self.upstream_leg = Leg(self)
        self.state = _CONNECTING
        self.opened_at = self.last_activity = time.monotonic()
        self.opened_wall = time.time()
        self.closed_at = 0.0
        self.lifetime_deadline = 0.0
        # The close reason: the first explicit one (`close()`, an error) while open; once
        # closed, that or else which side ended it (`_end_reason`), else `error`. A plain
        # attribute, not a property: read once per connection by the tracker.
        self.reason: CloseReason | None = None
        self._end_reason: CloseReason | None = None
        self._pending: list[bytes] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # The set-up task (listener), held strongly and cancelled if the connection goes first;
        # set and cleared by the task itself (attribute writes, not method calls: per connection).
        self.connect_task: asyncio.Task[None] | None = None
        self.watch: object | None = None  # the liveness watchdog's per-connection record
        # While set, client bytes are held and offered to it (e.g. a PROXY header parser).
        self.preamble: Callable[[MonitoredConnection], None] | None = None
        # Set by a listener whose loop server accepted the client: its set-up coroutine, run as
        # this connection's task once the client leg is made, with the peer's address.
        self.on_made: SetUp | None = None

    # -- public read-only view ------------------------------------------------------------------
    @property
    def bytes_client_to_upstream(self) -> int:
        return self.client_leg.bytes_in if self.upstream_leg.transport else 0

    @property
    def bytes_upstream_to_client(self) -> int:
        return self.upstream_leg.bytes_in

    @property
    def upstream(self) -> str | None:
        return None if self.target is None else self.target.label

    @property
    def client_socket(self) -> Any:
        return self.client_leg.socket

    @property
    def upstream_socket(self) -> Any:
        return self.upstream_leg.socket

    @property
    def half_closed(self) -> bool:
        return self.client_leg.eof != self.upstream_leg.eof

    def age(self, now: float | None = None) -> float:
        end = self.closed_at or (time.monotonic() if now is None else now)
        return end - self.opened_at

    def idle(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.last_activity

    def unsent(self) -> int:
        """Bytes connwatch holds that a peer has not taken yet (both directions)."""
        return self.client_leg.write_buffer + self.upstream_leg.write_buffer

    def statistics(self, now: float | None = None) -> ConnectionStats:
        """A frozen record as of `now` (monotonic; default the clock): built only when asked
        (a scrape, /connections, a log line), never on the per-read path."""
        if now is None:
            now = time.monotonic()
        return ConnectionStats(
            self.id,
            self.listener,
            self.client,
            self.upstream,
            self.state,
            self.reason,
            self.opened_wall,
            (self.closed_at or now) - self.opened_at,
            now - self.last_activity,
            self.bytes_client_to_upstream,
            self.bytes_upstream_to_client,
            self.client_leg.eof != self.upstream_leg.eof,
        )

    def __repr__(self) -> str:
        return (
            f"<MonitoredConnection {self.id} {self.listener} {self.client}->{self.upstream} "
            f"{self.state} c2u={self.bytes_client_to_upstream} u2c={self.bytes_upstream_to_client}>"
        )

    # -- wiring, called by the listener ---------------------------------------------------------
    @property
    def client_protocol(self) -> asyncio.Protocol:
        return self.client_leg

    def client_transport(self) -> asyncio.Transport | None:
        return self.client_leg.transport

    def upstream_protocol(self) -> asyncio.Protocol:
        return self.upstream_leg

    def hold(self, data: bytes) -> None:
        """Client bytes that arrived before the upstream leg exists.

        `client_made` paused reading, but uvloop starts reading an accepted socket after
        `connection_made` all the same: pause again here, or a client writing while the upstream
        connect hangs is read without bound. Only a PROXY header being awaited keeps reading."""
        if self._pending is None:
            self._pending = []
        self._pending.append(data)
        if self.preamble is not None:
            self.preamble(self)
        elif (client := self.client_leg.transport) is not None:
            client.pause_reading()

    def peek_held(self) -> bytes:
        if self._pending and len(self._pending) > 1:
            self._pending = [b"".join(self._pending)]
        return self._pending[0] if self._pending else b""

    def consume_held(self, nbytes: int) -> None:
        """Drop the first `nbytes` held bytes (a parsed PROXY header): they are not forwarded
        and so not counted."""
        rest = self.peek_held()[nbytes:]
        self._pending = [rest] if rest else None
        self.client_leg.bytes_in -= nbytes

    def upstream_connected(self, target: Target, preface: bytes = b"") -> None:
        """The upstream leg is up: send any preface (PROXY header) and held bytes, start reading."""
        if self.state is not _CONNECTING:
            return
        self.target = target
        self.state = _OPEN
        up = self.upstream_leg.transport
        client = self.client_leg.transport
        assert up is not None
        assert client is not None
        held = preface + b"".join(self._pending) if self._pending else preface
        self._pending = None
        if held:
            up.write(held)
        self.client_leg.sink = up
        if self.client_leg.eof:  # the client said everything before we got here
            up.write_eof() if up.can_write_eof() else None
            self.leg_ended(self.client_leg)
        elif not self.upstream_leg.write_paused:
            # Held bytes that filled the upstream's queue paused the client just now; then its
            # resume_writing() starts the client, not we (else reading would never pause again).
            client.resume_reading()
        self.observer.connection_opened(self)
        if self.timeouts.any:
            self._arm_timer()

    def client_made(self, leg: Leg) -> None:
        """The client leg's transport is made (`Leg.connection_made`, which set its limits)."""
        t = leg.transport
        assert t is not None
        start = self.on_made
        if start is not None:  # accepted by the loop's server: the address is known now
            peer = t.get_extra_info("peername")
            # format_peer's IPv4 case inline (a Python call less for most connections)
            if type(peer) is tuple and ":" not in peer[0]:
                self.client = f"{peer[0]}:{peer[1]}"
            else:
                self.client = format_peer(peer)
        elif not self.client:  # the listener passes the address accept() gave
            self.client = format_peer(t.get_extra_info("peername"))
        t.pause_reading()
        self.observer.connection_accepted(self)
        if start is not None:
            self.on_made = None
            # Made here, not by a listener method: a Python call less for every connection.
            # (`asyncio.Task(coro, name=)`: create_task's without a task factory; unnamed, 3.11
            # formats "Task-N" and uvloop names after (set_name), ~2.5k a connection.)
            self.connect_task = _Task(start(self, peer), name=SET_UP_TASK)

    # -- events from the legs -------------------------------------------------------------------
    def leg_ended(self, leg: Leg) -> None:
        """`leg`'s side ended its stream and the EOF was passed on (`Leg.eof_received`)."""
        if self._end_reason is None:
            self._end_reason = _CLIENT_CLOSED if leg is self.client_leg else _UPSTREAM_CLOSED
        if self.client_leg.eof and self.upstream_leg.eof:
            self._shut(abort=False)
        elif self.state is _OPEN:
            self.state = _HALF_CLOSED
            if self.timeouts.any:
                self._arm_timer()

    def leg_lost(self, leg: Leg, exc: BaseException | None) -> None:
        client = leg is self.client_leg
        reason = None if exc is None else reason_for_error(_CLIENT if client else _UPSTREAM, exc)
        if reason is not None and self.reason is None:
            self.reason = reason
        elif self._end_reason is None and self.reason is None:
            # The peer's side vanished without an EOF first (e.g. the transport closed under us).
            self._end_reason = _CLIENT_CLOSED if client else _UPSTREAM_CLOSED
        other = self.upstream_leg if client else self.client_leg
        if not other.lost:
            if other.transport is None:
                other.lost = True  # never connected
            elif reason is not None or self.state is not _CLOSING:
                self._shut(abort=reason is not None, reset=reason in _RESETS)
            # else: a clean close already under way (both legs closed by `_shut`): nothing to add
        if other.lost:  # both legs gone (else the other's loss finishes it)
            self._maybe_finish()

    # -- closing --------------------------------------------------------------------------------
    def close(self, reason: CloseReason, *, abort: bool = False) -> None:
        """Close both legs for `reason` (the first explicit reason wins)."""
        if self.state is _CLOSED:
            return
        if self.reason is None:
            self.reason = reason
        if self.connect_task is not None:
            self.connect_task.cancel()
        if self.upstream_leg.transport is None:
            self.upstream_leg.lost = True
        self._shut(abort=abort)
        self._maybe_finish()

    def _shut(self, *, abort: bool, reset: bool = False) -> None:
        if self.state is not _CLOSED:
            self.state = _CLOSING
        flushing = False
        for leg in (self.client_leg, self.upstream_leg):
            t = leg.transport
            if t is None or leg.lost:
                continue
            if reset:
                _set_linger_reset(t)
            if abort:
                t.abort()
                continue
            t.close()  # a no-op on a transport already closing (uvloop's and splice's)
            flushing = flushing or t.get_write_buffer_size() > 0
        if abort:
            return
        # A transport with nothing left to send reports its loss at once: the grace timer is
        # armed only while bytes are still going out (most closes need none).
        if flushing:
            self._schedule(_CLOSE_GRACE)
        elif self._timer is not None:  # an idle/lifetime check has nothing left to do
            self._timer.cancel()
            self._timer = None

    def _maybe_finish(self) -> None:
        if self.state is _CLOSED or not (self.client_leg.lost and self.upstream_leg.lost):
            return
        self.state = _CLOSED
        self.reason = self.reason or self._end_reason or _ERROR
        self.closed_at = time.monotonic()
        if self.connect_task is not None:  # e.g. still waiting for a PROXY header
            self.connect_task.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending = None
        self.observer.connection_closed(self)
        # The legs let go of the connection (no transport calls them any more):
        # without these cycles a closed connection is freed at once rather than by the garbage
        # collector (bench/instructions.py churn: no collections left over 1,000 connections).
        # (Unrolled: once per connection, no tuple and loop.)
        leg = self.client_leg
        leg.conn = None  # type: ignore[assignment]  # never read again: both legs are lost
        leg.bulk = None
        leg = self.upstream_leg
        leg.conn = None  # type: ignore[assignment]
        leg.bulk = None

    # -- timers: one handle for the nearest deadline --------------------------------------------
    def _arm_timer(self) -> None:
        if self.timeouts.any and self.state in (_OPEN, _HALF_CLOSED):
            self._schedule(self._next_check())

    def _schedule(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(delay, 0.0), self._on_timer)

    def _next_check(self) -> float:
        now = time.monotonic()
        t = self.timeouts
        waits = []
        if t.idle:
            waits.append(self.last_activity + t.idle - now)
        if t.half_close and self.state is _HALF_CLOSED:
            waits.append(self.last_activity + t.half_close - now)
        if self.lifetime_deadline:
            waits.append(self.lifetime_deadline - now)
        return min(waits) if waits else 3600.0

    def _on_timer(self) -> None:
        self._timer = None
        if self.state is _CLOSING:  # a graceful close that did not finish in time
            self._shut(abort=True)
            return
        if self.state is _CLOSED:
            return
        now = time.monotonic()
        t = self.timeouts
        idle = now - self.last_activity
        if t.idle and idle >= t.idle:
            self.close(CloseReason.IDLE_TIMEOUT)
        elif t.half_close and self.state is _HALF_CLOSED and idle >= t.half_close:
            self.close(CloseReason.HALF_CLOSE_TIMEOUT)
        elif self.lifetime_deadline and now >= self.lifetime_deadline:
            if self.is_quiet(_QUIET_RETRY, now) or now >= self.lifetime_deadline + self._grace():
                self.close(CloseReason.MAX_LIFETIME)
            else:
                self._schedule(_QUIET_RETRY)
        else:
            self._arm_timer()

    def _grace(self) -> float:
        # How long past max_lifetime we wait for a quiet gap before closing regardless.
        return max(1.0, self.timeouts.max_lifetime * 0.1)

    def is_quiet(self, period: float, now: float | None = None) -> bool:
        """No bytes moved for `period` seconds and nothing waiting to be sent either way."""
        return self.idle(now) >= period and self.unsent() == 0


_RESETS = (CloseReason.CLIENT_RESET, CloseReason.UPSTREAM_RESET)


def _set_linger_reset(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family != socket.AF_UNIX:
        with contextlib.suppress(OSError):  # already closed: nothing left to reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


ConnectionFactory = Callable[[], MonitoredConnection]
SetUp = Callable[[MonitoredConnection, Any], Coroutine[Any, Any, None]]
"""A listener's set-up of a connection whose client leg is made (`MonitoredConnection.on_made`)."""
