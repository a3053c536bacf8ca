"""One socket of a watched connection: the fd the watchdog borrows from its transport to read
TCP_INFO through, and what the watchdog remembers of the socket between beats.

`SocketLeg.beat` runs at every beat for every socket: plain attribute reads, one getsockopt
system call and one precompiled unpack, nothing more.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Final

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

__all__ = ["BorrowedSocket", "SocketLeg", "borrow_socket"]

_TCP_FAMILIES: Final = frozenset({socket.AF_INET, socket.AF_INET6})
_IPPROTO_TCP: Final = socket.IPPROTO_TCP
_TCP_INFO: Final[int] = getattr(socket, "TCP_INFO", -1)


class BorrowedSocket(socket.socket):
    """A socket object over a file descriptor its transport owns: for getsockopt only.

    Reading TCP_INFO through it costs about half of going through uvloop's pseudo-socket, which
    wraps its fd in a new `socket.socket` for every call. It never closes the fd, not even when
    garbage-collected without `detach()`: closing would pull the socket from under the transport.
    """

    __slots__ = ()

    def __del__(self) -> None:
        self.detach()


def borrow_socket(transport: asyncio.BaseTransport | None) -> socket.socket | None:
    if not TCP_INFO_SUPPORTED or transport is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in _TCP_FAMILIES:
        return None  # Unix socket legs have no TCP_INFO: the byte counts are all we judge by
    if type(sock) is socket.socket:
        return sock  # the splice path's own socket object: read it directly
    fd = sock.fileno()
    return None if fd < 0 else BorrowedSocket(sock.family, sock.type, sock.proto, fd)


class SocketLeg:
    """One socket of a watched connection, and what the watchdog remembers of it between beats.

    `rtt` and `retransmits` are the listener's counters (`ListenerTotals`) this socket adds to.
    """

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
        self,
        side: Side,
        transport: asyncio.BaseTransport | None,
        rtt: Histogram,
        retransmits: dict[Side, int],
        now: float,
    ) -> None:
        self.side = side
        self.transport = transport
        self._sock: socket.socket | None = None
        self.borrowed = False  # _sock looked up (once, at the first beat)
        self.rtt = rtt
        self.retransmits = retransmits
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
            self._sock = borrow_socket(self.transport)
        return self._sock

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
        sock = self._sock if self.borrowed else self.sock
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
        self.rtt.observe(rtt_us / 1e6)
        if total > self.retrans:
            self.retransmits[self.side] += total - self.retrans
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
        self.borrowed = True
