"""The two protocol legs of a proxied connection, the read buffer they share and their limits.

Hot path (per read): a leg hands what it read to the other leg's transport and adds to a plain
int. Everything else (timers, liveness, metrics) reads those ints. Two read paths, switched per
leg by how much each read brings (`transport.set_protocol`):

- small reads (requests, replies, an idle stream): `Leg` is an `asyncio.Protocol`, one Python
  call per read (`data_received`); the loop's own read buffer, nothing per connection;
- bulk (a read of `BULK_READ` or more, or of the whole buffer if that is smaller): the leg's
  `BulkReader`, a `BufferedProtocol` whose reads land in the listener's shared `ReadBuffer` and
  go out without another copy; after `QUIET_READS` smaller reads in a row the leg goes back.

The connection that owns the legs (`connection.MonitoredConnection`) is seen here only as a
`LegOwner`, so this module needs nothing of connection.py.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import Any, Protocol

from connwatch._types import ConnectionObserver, Direction, Side

#: A read this large means a busy flow: the leg moves to the copy-free buffered path. Below it, a
#: copy into a fresh `bytes` costs less than the buffered path's second Python call per read.
BULK_READ = 32 * 1024
_MIN_BULK_READ = 4096  # the smallest buffer_size: smaller reads never switch (one comparison)
#: Reads in a row under BULK_READ after which a bulk leg goes back to small reads.
QUIET_READS = 4


class ReadBuffer:
    """One read buffer shared by every leg of a listener.

    Reads are sequential on one loop, so a chunk is written on before the next read lands. When
    the sink cannot take a chunk at once, uvloop keeps a reference to the view instead of copying
    it, so the buffer is then handed over and a fresh one made (`renew`).
    """

    __slots__ = ("bulk_read", "size", "view")

    def __init__(self, size: int) -> None:
        self.size = size
        self.view = memoryview(bytearray(size))
        # A read of this many bytes moves a leg to this buffer (`Leg.data_received`).
        self.bulk_read = min(BULK_READ, size)

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
    client_leg: Leg
    upstream_leg: Leg

    @property
    def observer(self) -> ConnectionObserver[Any]: ...

    def hold(self, data: bytes) -> None: ...

    def client_made(self, leg: Leg) -> None: ...

    def leg_ended(self, leg: Leg) -> None: ...

    def leg_lost(self, leg: Leg, exc: BaseException | None) -> None: ...


class Leg(asyncio.Protocol):
    """One side's protocol. What it reads goes straight to the other leg's transport."""

    __slots__ = (
        "bulk",
        "bytes_in",
        "conn",
        "eof",
        "lost",
        "sink",
        "transport",
        "write_paused",
    )

    def __init__(self, conn: LegOwner) -> None:
        # Its side and the other leg are not kept (16 bytes a leg): the connection's two legs
        # tell them (`side`, `other`).
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        # Where this leg's bytes go; None until forwarding starts (until then they are held).
        self.sink: asyncio.Transport | None = None
        self.bytes_in = 0  # bytes read from this side and handed to the other
        self.eof = False
        self.lost = False
        self.write_paused = False  # between pause_writing() and resume_writing()
        self.bulk: BulkReader | None = None  # the transport's protocol while the flow is busy

    # -- asyncio callbacks; none of them awaits ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it. (No cast():
        # a Python call for every leg.)
        self.transport = transport  # type: ignore[assignment]
        conn = self.conn
        # `high` positionally (its first parameter): a keyword costs the Cython method a
        # keyword parse, twice a connection.
        transport.set_write_buffer_limits(conn.buffer.size)  # type: ignore[attr-defined]
        if self is conn.client_leg:
            conn.client_made(self)
        else:  # the upstream leg forwards to the client (a call into the connection less)
            self.sink = conn.client_leg.transport

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.last_activity = monotonic()
        nbytes = len(data)
        self.bytes_in += nbytes
        sink = self.sink
        if sink is None:  # the upstream is not connected yet (uvloop may read once after pause)
            conn.hold(data)
            return
        sink.write(data)  # bytes: a transport may keep it queued as it is
        if nbytes >= _MIN_BULK_READ and nbytes >= conn.buffer.bulk_read:
            self._to_bulk()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        """A read into the shared buffer (the bulk path; the splice path's rare copies)."""
        conn = self.conn
        buf = conn.buffer
        conn.last_activity = monotonic()
        self.bytes_in += nbytes
        sink = self.sink
        if sink is None:  # the upstream is not connected yet (uvloop may read once after pause)
            conn.hold(bytes(buf.view[:nbytes]))
            return
        sink.write(buf.view[:nbytes])
        if sink.get_write_buffer_size():
            buf.renew()

    def eof_received(self) -> bool:
        # The EOF passed on here, not by a call into the connection (twice a connection).
        self.eof = True
        sink = self.sink
        if sink is None:  # client EOF before forwarding started: passed on once it starts
            return True
        conn = self.conn
        # The other side ended first: leg_ended closes both transports now, and the close sends
        # the FIN after anything still queued, as a write_eof would (a shutdown() fewer). Every
        # sink here can write an EOF (TCP and Unix stream transports, both data paths): not
        # asked (a Python call a side on the splice path).
        other = conn.upstream_leg if self is conn.client_leg else conn.client_leg
        if not other.eof and not sink.is_closing():
            sink.write_eof()
        conn.leg_ended(self)
        return True  # keep the transport open: the other direction may still flow

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

    # -- switching read paths -------------------------------------------------------------------
    def _to_bulk(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.bulk is None:
            self.bulk = BulkReader(self)
        transport.set_protocol(self.bulk)

    def to_small_reads(self) -> None:
        """Back to `data_received`; the BulkReader goes, so an idle leg holds nothing of it."""
        transport = self.transport
        self.bulk = None
        if transport is not None and not transport.is_closing():
            transport.set_protocol(self)

    # -- helpers --------------------------------------------------------------------------------
    @property
    def side(self) -> Side:
        return Side.CLIENT if self is self.conn.client_leg else Side.UPSTREAM

    @property
    def other(self) -> Leg | None:
        """The connection's other leg; None once the connection has let go of its legs."""
        conn: LegOwner | None = self.conn
        if conn is None:
            return None
        client = conn.client_leg
        return conn.upstream_leg if self is client else client

    @property
    def socket(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("socket")

    @property
    def write_buffer(self) -> int:
        t = self.transport
        return 0 if t is None or t.is_closing() else t.get_write_buffer_size()


def _direction_into(side: Side) -> Direction:
    return Direction.CLIENT_TO_UPSTREAM if side is Side.UPSTREAM else Direction.UPSTREAM_TO_CLIENT


class BulkReader(asyncio.BufferedProtocol):
    """A busy leg's protocol: reads land in the listener's shared buffer (no copy into a
    `bytes`), the rest is the leg's. Made on the first large read, dropped after QUIET_READS
    small ones."""

    __slots__ = ("leg", "quiet")

    def __init__(self, leg: Leg) -> None:
        self.leg = leg
        self.quiet = 0  # reads in a row under BULK_READ

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.leg.conn.buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        leg = self.leg
        leg.buffer_updated(nbytes)
        if nbytes >= leg.conn.buffer.bulk_read:
            self.quiet = 0
            return
        self.quiet += 1
        if self.quiet >= QUIET_READS:
            leg.to_small_reads()

    def eof_received(self) -> bool:
        return self.leg.eof_received()

    def pause_writing(self) -> None:
        self.leg.pause_writing()

    def resume_writing(self) -> None:
        self.leg.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.leg.connection_lost(exc)
