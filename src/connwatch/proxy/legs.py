"""The two protocol legs of a proxied connection, the read buffer they share and their limits.

Hot path (per chunk): `Leg.buffer_updated` writes a view of the shared read buffer to the other
leg and adds to a plain int. Everything else (timers, liveness, metrics) reads those ints.
The connection that owns the legs (`connection.MonitoredConnection`) is seen here only as a
`LegOwner`, so this module needs nothing of connection.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from connwatch._types import ConnectionObserver, Direction, Side


class ReadBuffer:
    """One read buffer shared by every leg of a listener.

    Reads are sequential on one loop, so a chunk is written on before the next read lands. When
    the sink cannot take a chunk at once, uvloop keeps a reference to the view instead of copying
    it, so the buffer is then handed over and a fresh one made (`renew`).
    """

    __slots__ = ("size", "view")

    def __init__(self, size: int) -> None:
        self.size = size
        self.view = memoryview(bytearray(size))

    def renew(self) -> None:
        self.view = memoryview(bytearray(self.size))


class Timeouts:
    """The per-listener limits a connection enforces (seconds; 0 = off)."""

    __slots__ = ("any", "half_close", "idle", "max_lifetime")

    def __init__(self, idle: float, half_close: float, max_lifetime: float) -> None:
        self.idle = idle
        self.half_close = half_close
        self.max_lifetime = max_lifetime
        # Whether any is on: an attribute, not a property (read twice for every connection).
        self.any = bool(idle or half_close or max_lifetime)


class LegOwner(Protocol):
    """What a leg reads and calls on its connection (`connection.MonitoredConnection`)."""

    buffer: ReadBuffer
    last_activity: float

    @property
    def observer(self) -> ConnectionObserver[Any]: ...

    def hold(self, data: bytes) -> None: ...

    def leg_made(self, leg: Leg) -> None: ...

    def leg_eof(self, leg: Leg) -> bool: ...

    def leg_lost(self, leg: Leg, exc: BaseException | None) -> None: ...


class Leg(asyncio.BufferedProtocol):
    """One side's protocol. Reads land in the shared buffer and go straight to the other leg."""

    __slots__ = (
        "bytes_in",
        "conn",
        "eof",
        "lost",
        "other",
        "side",
        "sink",
        "transport",
        "write_paused",
    )

    def __init__(self, conn: LegOwner, side: Side) -> None:
        self.conn = conn
        self.side = side
        self.transport: asyncio.Transport | None = None
        # Where this leg's bytes go; None until forwarding starts (until then they are held).
        self.sink: asyncio.Transport | None = None
        self.other: Leg | None = None
        self.bytes_in = 0  # bytes read from this side and handed to the other
        self.eof = False
        self.lost = False
        self.write_paused = False  # between pause_writing() and resume_writing()

    # -- asyncio callbacks; none of them awaits ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it. (No cast():
        # a Python call for every leg.)
        self.transport = transport  # type: ignore[assignment]
        self.conn.leg_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        buf = conn.buffer
        conn.last_activity = time.monotonic()
        self.bytes_in += nbytes
        sink = self.sink
        if sink is None:  # the upstream is not connected yet (uvloop may read once after pause)
            conn.hold(bytes(buf.view[:nbytes]))
            return
        sink.write(buf.view[:nbytes])
        if sink.get_write_buffer_size():
            buf.renew()

    def eof_received(self) -> bool:
        self.eof = True
        return self.conn.leg_eof(self)

    def pause_writing(self) -> None:
        # This leg's socket is full: stop reading from the side that feeds it.
        self.write_paused = True
        other = self.other
        if other is not None and other.transport is not None and not other.eof:
            other.transport.pause_reading()
            self.conn.observer.flow_paused(self.conn, _direction_into(self.side))

    def resume_writing(self) -> None:
        self.write_paused = False
        other = self.other
        # Only once forwarding has started on the other leg: before that it stays paused.
        if other is not None and other.sink is not None and not other.eof:
            assert other.transport is not None
            other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.conn.leg_lost(self, exc)

    # -- helpers --------------------------------------------------------------------------------
    @property
    def socket(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("socket")

    @property
    def write_buffer(self) -> int:
        t = self.transport
        return 0 if t is None or t.is_closing() else t.get_write_buffer_size()


def _direction_into(side: Side) -> Direction:
    return Direction.CLIENT_TO_UPSTREAM if side is Side.UPSTREAM else Direction.UPSTREAM_TO_CLIENT
