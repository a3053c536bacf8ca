"""One socket of a watched connection: the fd the watchdog borrows from its transport to read
TCP_INFO through, and what the watchdog remembers of the socket between beats.

`SocketLeg.beat` runs at every beat for every socket: plain attribute reads, one getsockopt
system call and one precompiled unpack, nothing more.
"""

from __future__ import annotations

import _socket
import asyncio
import socket
import struct
from typing import Final, Literal

from connwatch._types import Side
from connwatch.histogram import Histogram
from connwatch.liveness.tcp_info import (
    CORE_SIZE,
    TCP_ESTABLISHED,
    TCP_INFO_SUPPORTED,
    TcpCore,
    parse_core,
    plain_of_short,
    unpack_plain,
)

__all__ = ["BorrowedSocket", "SideCounters", "SocketLeg", "borrow_socket"]

_TCP_FAMILIES: Final = frozenset({socket.AF_INET, socket.AF_INET6})
_IPPROTO_TCP: Final = socket.IPPROTO_TCP
_TCP_INFO: Final[int] = getattr(socket, "TCP_INFO", -1)


class BorrowedSocket(_socket.socket):
    """A socket object over a file descriptor its transport owns: for getsockopt only.

    Reading TCP_INFO through it costs about half of going through uvloop's pseudo-socket, which
    wraps its fd in a new `socket.socket` for every call. It never closes the fd, not even when
    garbage-collected without `detach()`: closing would pull the socket from under the transport.
    The C socket type, not `socket.socket`: none of the latter's Python-level state (makefile
    refcounts, a weakref slot) is needed here, and it is 24 bytes smaller (64 against 88; two per
    watched connection).
    """

    __slots__ = ()

    def __del__(self) -> None:
        self.detach()


def borrow_socket(transport: asyncio.BaseTransport | None) -> _socket.socket | None:
    if not TCP_INFO_SUPPORTED or transport is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in _TCP_FAMILIES:
        return None  # Unix socket legs have no TCP_INFO: the byte counts are all we judge by
    if type(sock) is socket.socket:
        return sock  # the splice path's own socket object: read it directly
    fd = sock.fileno()
    return None if fd < 0 else BorrowedSocket(sock.family, sock.type, sock.proto, fd)


class SideCounters:
    """What the sockets of one side of one listener add to (`ListenerTotals`): one object shared
    by all of them, so a `SocketLeg` keeps one reference where it kept three."""

    __slots__ = ("retransmits", "rtt", "side")

    def __init__(self, side: Side, rtt: Histogram, retransmits: dict[Side, int]) -> None:
        self.side = side
        self.rtt = rtt
        self.retransmits = retransmits


class SocketLeg:
    """One socket of a watched connection, and what the watchdog remembers of it between beats.

    `counters` are the listener's counters (`ListenerTotals`) for this socket's side.
    """

    __slots__ = (
        "_sock",
        "acked",
        "counters",
        "in_flight",
        "progress_at",
        "retrans",
        "transport",
    )

    def __init__(
        self,
        counters: SideCounters,
        transport: asyncio.BaseTransport | None,
        now: float,
    ) -> None:
        self.counters = counters
        self.transport = transport
        # False until looked up (once, at the first beat); then the socket, or None for none.
        self._sock: _socket.socket | Literal[False] | None = False
        self.retrans = 0  # total_retrans already added to the listener's counter
        self.acked = -1  # bytes_acked at the last beat
        self.in_flight = False  # unacked > 0 at the last beat
        self.progress_at = now  # when ACKs last made progress (or nothing was in flight)

    @property
    def side(self) -> Side:
        return self.counters.side

    @property
    def sock(self) -> _socket.socket | None:
        """The socket to read TCP_INFO from, looked up at the first beat, not when the watch
        starts: on a churning service most connections end before their first beat."""
        sock = self._sock
        if sock is False:
            sock = self._sock = borrow_socket(self.transport)
        return sock

    def beat(self, now: float) -> TcpCore | None:
        """Read TCP_INFO and count RTT and retransmits (SPEC section 8). Returns the fields when
        they need `verdicts.judge`; None when the socket is plainly fine (established, nothing
        in flight, window open: the common case) or has no TCP_INFO to read.

        This runs at every beat for every socket, so `read_tcp_core` is inlined here.
        """
        transport = self.transport
        # A closing transport may already have closed the fd, whose number the next accept can
        # reuse: never read through a borrowed fd once its owner is closing.
        if transport is None or transport.is_closing():
            return None
        sock = self._sock
        if sock is False:
            sock = self.sock
        if sock is None:
            return None
        try:
            data = sock.getsockopt(_IPPROTO_TCP, _TCP_INFO, CORE_SIZE)
        except (OSError, ValueError):
            return None
        try:
            fields: TcpCore | None = unpack_plain(data)
        except struct.error:  # an older kernel's shorter struct
            fields = plain_of_short(data)
        if fields is None:
            return None
        state, unacked, rtt_us, total, acked, snd_wnd = fields
        counters = self.counters
        counters.rtt.observe(rtt_us / 1e6)
        if total > self.retrans:
            counters.retransmits[counters.side] += total - self.retrans
            self.retrans = total
        if state == TCP_ESTABLISHED and not unacked and snd_wnd > 0:
            # What `verdicts.track_progress` records of a socket with nothing in flight.
            self.progress_at = now
            self.acked = acked
            self.in_flight = False
            return None
        return parse_core(data)

    def release(self) -> None:
        if isinstance(self._sock, BorrowedSocket):
            self._sock.detach()
        self._sock = None
