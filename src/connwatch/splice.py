"""The zero-copy Linux data path: `os.splice` socket → pipe → socket, under MonitoredConnection.

`SpliceTransport` is an `asyncio.Transport` over a raw non-blocking socket, driven by the loop's
`add_reader`/`add_writer`. It keeps the transport contract the connection legs already rely on
(pause/resume reading, `pause_writing`/`resume_writing` on the protocol, `write_eof`, graceful
`close` that flushes, `abort`, `connection_lost(exc)`), so MonitoredConnection runs on it
unchanged: the same states, close reasons, timers, observer calls and byte counters as on the
portable path. Only the bytes take another road: once a leg has a sink, a readable socket is
spliced into a pipe and the pipe straight into the sink's socket; nothing is copied to user space.

A pipe is held only while bytes are in flight (see `PipePool`), so idle connections cost no file
descriptors beyond their two sockets. Before a leg has a sink (a PROXY header being read) or when
no pipe can be had (out of descriptors), reads fall back to the leg's `get_buffer`/
`buffer_updated`, as on the portable path. See docs/data-paths.md for the reasoning.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from connwatch.exceptions import NoHealthyUpstreamError, UpstreamConnectError

if TYPE_CHECKING:
    from connwatch._types import Address
    from connwatch.config import ListenerConfig
    from connwatch.connection import MonitoredConnection
    from connwatch.sockopts import SocketOptions
    from connwatch.upstream import Target, UpstreamPool

__all__ = [
    "SPLICE_AVAILABLE",
    "PipePool",
    "PipePoolStats",
    "SplicePath",
    "SpliceTransport",
    "fd_pressure",
    "note_fd_pressure",
    "pipe_pool",
    "release_idle_pipes",
    "uses_splice",
]

SPLICE_AVAILABLE: Final = sys.platform == "linux" and hasattr(os, "splice")
MAX_CHUNK: Final = 1024 * 1024  # bytes per splice: the default pipe-max-size of Linux
MAX_IDLE_PIPES: Final = 256  # idle pipes kept per pool (512 fds of the 20,000 a process may hold)
PIPE_IDLE_TIMEOUT: Final = 5.0  # seconds: a pool nobody took from for this long closes its pipes
_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_SETPIPE_SZ: Final[int | None] = getattr(fcntl, "F_SETPIPE_SZ", None)
_NO_FDS: Final = frozenset({errno.EMFILE, errno.ENFILE})
FD_PRESSURE_HOLD: Final = 1.0  # seconds without new pipes after running out of descriptors
_WRITE_HIGH: Final = 64 * 1024  # asyncio's default high-water mark until the leg sets its own

Pipe = tuple[int, int]  # (read end, write end)


def uses_splice(data_path: str) -> bool:
    """Whether a listener's `data_path` means splice here (`auto`: where the kernel has it)."""
    return data_path == "splice" or (data_path == "auto" and SPLICE_AVAILABLE)


# -- pipes ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PipePoolStats:
    size: int  # bytes each pipe was asked to hold
    idle: int  # pipes waiting in the pool
    created: int
    reused: int  # takes served from the pool
    discarded: int  # closed after an error or while holding bytes: never reused


class PipePool:
    """Empty pipes for splicing, taken while bytes are in flight and given back when drained.

    A pipe that saw an error, or still holds bytes nobody will read, is closed (`discard`), never
    pooled: a reused dirty pipe would hand one connection's bytes to the next. Idle pipes are
    closed once none was taken for `idle_timeout` seconds, so a quiet process holds none.
    """

    __slots__ = (
        "_idle",
        "_takes_at_check",
        "_trim",
        "created",
        "discarded",
        "idle_timeout",
        "max_idle",
        "reused",
        "size",
    )

    def __init__(
        self, size: int, max_idle: int = MAX_IDLE_PIPES, idle_timeout: float = PIPE_IDLE_TIMEOUT
    ) -> None:
        self.size = size
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: list[Pipe] = []
        self._trim: asyncio.TimerHandle | None = None
        self._takes_at_check = 0
        self.created = 0
        self.reused = 0
        self.discarded = 0

    def take(self) -> Pipe:
        """An empty pipe; OSError (EMFILE...) when none can be made, or while the process is
        short of descriptors (the caller then copies through user space)."""
        if self._idle:
            self.reused += 1
            return self._idle.pop()
        if fd_pressure():
            raise OSError(errno.EMFILE, "no new pipes while descriptors are short")
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in _NO_FDS:
                note_fd_pressure()
            raise
        self.created += 1
        if _SETPIPE_SZ is not None:
            # Refused past the user's pipe budget (pipe-user-pages-soft): the pipe keeps its size.
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, _SETPIPE_SZ, self.size)
        return r, w

    def give(self, pipe: Pipe) -> None:
        """Return a pipe that is empty and saw no error."""
        if len(self._idle) < self.max_idle and not fd_pressure():
            self._idle.append(pipe)
            if self._trim is None:
                self._arm_trim()
        else:
            _close_pipe(pipe)

    def _arm_trim(self) -> None:
        self._takes_at_check = self.created + self.reused
        loop = asyncio.get_running_loop()
        self._trim = loop.call_later(self.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        self._trim = None
        if self.created + self.reused == self._takes_at_check:
            self.close()  # nothing taken for a whole period
        elif self._idle:
            self._arm_trim()

    def discard(self, pipe: Pipe) -> None:
        self.discarded += 1
        _close_pipe(pipe)

    def close(self) -> None:
        """Close the idle pipes (pipes in use are closed by their transports)."""
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        while self._idle:
            _close_pipe(self._idle.pop())

    def statistics(self) -> PipePoolStats:
        return PipePoolStats(self.size, len(self._idle), self.created, self.reused, self.discarded)


def _close_pipe(pipe: Pipe) -> None:
    for fd in pipe:
        with contextlib.suppress(OSError):
            os.close(fd)


_POOLS: dict[int, PipePool] = {}


def release_idle_pipes() -> int:
    """Close every idle pooled pipe (they are a cache); the number of pipes closed."""
    closed = 0
    for pool in _POOLS.values():
        closed += pool.statistics().idle
        pool.close()
    return closed


_pressure_until = 0.0  # monotonic time until which no pipe is made or pooled


def note_fd_pressure() -> int:
    """The process ran out of descriptors: for a while, make and pool no pipes (legs copy
    through user space, as the portable path does), so that splicing does not take the fds
    that accepts and upstream connects need. Idle pipes are closed; returns how many."""
    global _pressure_until
    _pressure_until = time.monotonic() + FD_PRESSURE_HOLD
    return release_idle_pipes()


def fd_pressure() -> bool:
    return _pressure_until > 0.0 and time.monotonic() < _pressure_until


def pipe_pool(size: int) -> PipePool:
    """The process's pool of pipes of `size` bytes: one per size, shared by every listener, since
    the descriptor limit is per process and a removed listener must not strand idle pipes."""
    pool = _POOLS.get(size)
    if pool is None:
        pool = _POOLS[size] = PipePool(size)
    return pool


# -- the transport ----------------------------------------------------------------------------------
class Leg(Protocol):
    """What a SpliceTransport needs of its protocol: MonitoredConnection's `_Leg` fits."""

    sink: asyncio.Transport | None
    bytes_in: int

    @property
    def conn(self) -> MonitoredConnection: ...

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...

    def get_buffer(self, sizehint: int) -> memoryview: ...

    def buffer_updated(self, nbytes: int) -> None: ...

    def eof_received(self) -> bool: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


class SpliceTransport(asyncio.Transport):
    """One proxied socket. Reading side: splice into a pipe, drain the pipe into the sink's socket.
    Writing side: bytes bound here are the feeder's pipe (plus `_wbuf`, a rare user-space queue
    for the PROXY preface, held client bytes and the out-of-pipes fallback)."""

    __slots__ = (
        "_chunk",
        "_closed",
        "_closing",
        "_eof",
        "_eof_out",
        "_fd",
        "_feeder",
        "_high",
        "_info",
        "_loop",
        "_paused",
        "_pipe",
        "_piped",
        "_pipes",
        "_protocol",
        "_reading",
        "_sink",
        "_sock",
        "_wbuf",
        "_write_paused",
        "_writing",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: Leg,
        pipes: PipePool,
        chunk: int,
    ) -> None:
        super().__init__()
        self._info: dict[str, Any] = {"socket": sock}  # get_extra_info, peer names filled lazily
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._pipes = pipes
        self._chunk = chunk
        # Reading side: this socket's bytes, on their way to the sink.
        self._sink: SpliceTransport | None = None
        self._pipe: Pipe | None = None  # held only while it holds bytes
        self._piped = 0  # bytes in the pipe, not yet in the sink's socket
        self._reading = False  # registered with add_reader
        self._paused = False  # pause_reading() in force
        self._eof = False
        # Writing side: bytes on their way into this socket.
        self._feeder: SpliceTransport | None = None  # whose pipe drains into this socket
        self._wbuf = bytearray()
        self._writing = False  # registered with add_writer
        self._write_paused = False  # the protocol was told pause_writing()
        self._high = _WRITE_HIGH
        self._eof_out = False  # write_eof() asked for
        self._closing = False
        self._closed = False  # socket closed, connection_lost scheduled

    def start(self) -> None:
        """Hand the transport to its protocol and start reading unless the protocol paused it.

        A client leg pauses at once (no upstream yet); the first segment is read all the same,
        as uvloop does on the portable path: the leg holds it, a PROXY header in it is seen
        without waiting, and a socket closed before the upstream answers closes with a FIN
        rather than the RST that unread data would cause.
        """
        self._protocol.connection_made(self)
        if self._paused and self._protocol.sink is None and not self._closing:
            self._read_copy()
        self._want_read()

    def __repr__(self) -> str:
        return f"<SpliceTransport fd={self._fd} piped={self._piped} closing={self._closing}>"

    # -- asyncio.Transport ----------------------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        info = self._info
        if name in ("peername", "sockname") and name not in info:
            try:
                info[name] = getattr(self._sock, "get" + name)()
            except OSError:
                return default
        return info.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return self._reading

    def get_protocol(self) -> asyncio.BaseProtocol:
        return cast(asyncio.BaseProtocol, self._protocol)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise NotImplementedError("a splice transport keeps its connection leg")

    def pause_reading(self) -> None:
        self._paused = True
        self._stop_reader()

    def resume_reading(self) -> None:
        self._paused = False
        self._want_read()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = _WRITE_HIGH if high is None else high

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return 0, self._high

    def get_write_buffer_size(self) -> int:
        feeder = self._feeder
        return len(self._wbuf) + (feeder._piped if feeder is not None else 0)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._eof_out or not data:
            return
        if not self._pending():
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        self._wbuf += data
        self._start_writer()
        if len(self._wbuf) > self._high:
            self._pause_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_out or self._closing:
            return
        self._eof_out = True
        if not self._pending():
            self._shutdown_write()

    def close(self) -> None:
        """Stop reading; close once everything bound for this socket has gone out."""
        if self._closing:
            return
        self._closing = True
        self._stop_reader()
        if self._pending():
            self._start_writer()
        else:
            self._finish(None)

    def abort(self) -> None:
        self._closing = True
        self._finish(None)

    # -- reading side ---------------------------------------------------------------------------
    def _want_read(self) -> None:
        if self._reading or self._paused or self._closing or self._eof or self._piped:
            return
        if self._sink is None:
            sink = self._protocol.sink
            if isinstance(sink, SpliceTransport):  # set once forwarding starts, then never changes
                self._sink = sink
                sink._feeder = self
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True

    def _stop_reader(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        sink = self._sink
        if sink is None:
            self._read_copy()  # no sink yet: the leg holds what arrives (PROXY header, ...)
            return
        if sink._closing:
            self._stop_reader()  # the connection is closing: nothing more can go there
            return
        try:
            pipe = self._pipe = self._pipes.take()
        except OSError:
            self._read_copy()  # out of descriptors: copy this chunk through user space
            return
        try:
            n = os.splice(self._fd, pipe[1], self._chunk, flags=_FLAGS)
        except (BlockingIOError, InterruptedError):
            self._give_pipe()
            return
        except OSError as exc:
            self._discard_pipe()
            self._fatal(exc)
            return
        if not n:
            self._give_pipe()
            self._read_eof()
            return
        self._piped = n
        self._protocol.conn.last_activity = time.monotonic()
        if sink._wbuf or not self._drain():
            self._stop_reader()  # not another byte in until the sink has taken these
            sink._backlogged()

    def _drain(self) -> bool:
        """Splice the pipe into the sink's socket; True once it is empty (and back in the pool).

        Bytes count for this leg when they reach the sink's socket, from splice's return values.
        """
        sink = self._sink
        pipe = self._pipe
        assert sink is not None
        assert pipe is not None
        left = self._piped
        moved = 0
        try:
            while left:
                n = os.splice(pipe[0], sink._fd, left, flags=_FLAGS)
                if n <= 0:  # cannot happen while we hold the write end; never spin on it
                    raise OSError(errno.EIO, "splice pipe ran dry")
                left -= n
                moved += n
        except (BlockingIOError, InterruptedError):
            return self._drained_some(moved, left)
        except OSError as exc:
            self._drained_some(moved, left)
            self._discard_pipe()
            sink._fatal(exc)
            return False
        self._protocol.bytes_in += moved
        self._piped = 0
        self._give_pipe()
        return True

    def _drained_some(self, moved: int, left: int) -> bool:
        self._protocol.bytes_in += moved
        self._piped = left
        return False

    def _read_copy(self) -> None:
        leg = self._protocol
        try:
            n = self._sock.recv_into(leg.get_buffer(-1))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        if n:
            leg.buffer_updated(n)
        else:
            self._read_eof()

    def _read_eof(self) -> None:
        self._eof = True
        self._stop_reader()
        if not self._protocol.eof_received():
            self.close()

    def _give_pipe(self) -> None:
        pipe = self._pipe
        if pipe is not None:
            self._pipe = None
            self._pipes.give(pipe)

    def _discard_pipe(self) -> None:
        pipe = self._pipe
        if pipe is not None:
            self._pipe = None
            self._piped = 0
            self._pipes.discard(pipe)

    # -- writing side ---------------------------------------------------------------------------
    def _pending(self) -> bool:
        feeder = self._feeder
        return bool(self._wbuf) or (feeder is not None and feeder._piped > 0)

    def _backlogged(self) -> None:
        """The feeder holds bytes this socket cannot take now: wait for room, pause the feeder."""
        self._start_writer()
        self._pause_writing()

    def _pause_writing(self) -> None:
        if not self._write_paused:
            self._write_paused = True
            # The leg pauses reading on the feeding side and counts flow_paused, as on the
            # portable path when a transport passes its high-water mark.
            self._protocol.pause_writing()

    def _start_writer(self) -> None:
        if not self._writing and not self._closed:
            self._loop.add_writer(self._fd, self._on_writable)
            self._writing = True

    def _stop_writer(self) -> None:
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _on_writable(self) -> None:
        if self._wbuf and not self._flush_wbuf():
            return
        feeder = self._feeder
        if feeder is not None and feeder._piped and not feeder._drain():
            return
        self._stop_writer()
        if feeder is not None:
            feeder._want_read()  # unless something else paused it
        if self._write_paused:
            self._write_paused = False
            self._protocol.resume_writing()
        if self._eof_out:
            self._shutdown_write()
        if self._closing:
            self._finish(None)

    def _flush_wbuf(self) -> bool:
        try:
            sent = self._sock.send(self._wbuf)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._fatal(exc)
            return False
        del self._wbuf[:sent]
        return not self._wbuf

    def _shutdown_write(self) -> None:
        # A peer that already reset shows it on the next read, with the right close reason.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    # -- the end --------------------------------------------------------------------------------
    def _fatal(self, exc: OSError) -> None:
        self._closing = True
        self._finish(exc)

    def _finish(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_reader()
        self._stop_writer()
        feeder = self._feeder
        if feeder is not None:  # bytes bound here that can no longer arrive
            feeder._discard_pipe()
        sink = self._sink
        if self._pipe is not None and (sink is None or sink._closed):
            self._discard_pipe()  # nobody is left to drain it
        self._wbuf.clear()
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)


# -- the listener's side ----------------------------------------------------------------------------
class _Owner(Protocol):
    """What SplicePath reads from its listener, live: a reload replaces them."""

    @property
    def pool(self) -> UpstreamPool: ...

    @property
    def config(self) -> ListenerConfig: ...

    @property
    def upstream_options(self) -> SocketOptions: ...


class SplicePath:
    """A listener's splice data path. It stands in for the loop when an accepted socket is taken
    over (`connect_accepted_socket`) and for the upstream pool when a target is reached
    (`connect`), with the same signatures, so the listener's own sequence stays as it is."""

    def __init__(self, owner: _Owner, pipes: PipePool | None = None) -> None:
        self._owner = owner
        self._pipes = pipes  # None: the process's pool for the listener's chunk size

    def _transport(self, sock: socket.socket, protocol: asyncio.BaseProtocol) -> SpliceTransport:
        chunk = min(self._owner.config.buffer_size, MAX_CHUNK)
        pipes = self._pipes or pipe_pool(chunk)
        loop = asyncio.get_running_loop()
        return SpliceTransport(loop, sock, cast(Leg, protocol), pipes, chunk)

    async def connect_accepted_socket(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], sock: socket.socket
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        """Wrap an accepted, non-blocking client socket (nothing to wait for on this path)."""
        protocol = protocol_factory()
        transport = self._transport(sock, protocol)
        transport.start()
        return transport, protocol

    async def connect(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        *,
        timeout: float,
        attempts: int,
    ) -> tuple[asyncio.Transport, Target]:
        """As `UpstreamPool.connect` (kept in step with it): the first target that answers, up to
        `attempts` tries, with the same failure and duration counts."""
        order = self._owner.pool.candidates()
        if not order:
            raise NoHealthyUpstreamError("every upstream target is DOWN")
        errors: list[str] = []
        out_of_fds = False
        for target in itertools.islice(itertools.cycle(order), attempts):
            started = time.monotonic()
            target.connecting += 1
            try:
                async with asyncio.timeout(timeout):
                    sock = await open_socket(target.address, self._owner.upstream_options)
            except (OSError, TimeoutError) as exc:
                out_of_fds = out_of_fds or getattr(exc, "errno", None) in _NO_FDS
                target.connect_failures += 1
                errors.append(f"{target.label}: {_describe(exc)}")
                continue
            finally:
                target.connecting -= 1
            target.connect_duration.observe(time.monotonic() - started)
            transport = self._transport(sock, protocol_factory())
            transport.start()
            return transport, target
        raise UpstreamConnectError("; ".join(errors), out_of_fds=out_of_fds)


async def open_socket(address: Address, options: SocketOptions = ()) -> socket.socket:
    """A connected non-blocking stream socket to `address`, with `options` (keep-alive,
    TCP_NODELAY) set on a TCP socket before it connects: a plain socket, so no per-call wrapper."""
    loop = asyncio.get_running_loop()
    if address.path is not None:
        return await _connect(loop, socket.AF_UNIX, address.path, ())
    host = address.host or "127.0.0.1"
    family = _numeric_family(host)
    if family is not None:
        return await _connect(loop, family, (host, address.port), options)
    infos = await loop.getaddrinfo(host, address.port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(errno.EHOSTUNREACH, f"{host} has no address")
    error: OSError | None = None
    for family, _, _, _, addr in infos:
        try:
            return await _connect(loop, family, addr, options)
        except OSError as exc:
            error = exc
    assert error is not None
    raise error


async def _connect(
    loop: asyncio.AbstractEventLoop, family: int, addr: Any, options: SocketOptions
) -> socket.socket:
    sock = _new_socket(family)
    try:
        sock.setblocking(False)
        for level, option, value in options:
            # An option the kernel refuses is skipped, the others still set (as sockopts does).
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)
        await loop.sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    return sock


def _new_socket(family: int) -> socket.socket:
    try:
        return socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        # Out of descriptors: idle pooled pipes go before a connection does.
        if exc.errno in _NO_FDS and note_fd_pressure():
            return socket.socket(family, socket.SOCK_STREAM)
        raise


def _numeric_family(host: str) -> int | None:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not getattr(exc, "errno", None):
        return "connect timed out"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's sock_connect puts the address in strerror
    return type(exc).__name__
