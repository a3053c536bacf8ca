"""SpliceTransport: an asyncio.Transport over a raw socket whose reads are spliced, not copied.

It keeps the transport contract the connection legs rely on (pause/resume reading,
`pause_writing`/`resume_writing` on the protocol, `write_eof`, a `close` that flushes first,
`abort`, `connection_lost(exc)`), so MonitoredConnection runs on it unchanged. Once a leg has a
sink, a readable socket is spliced into a pipe and the pipe into the sink's socket; until then
(a PROXY header being read), or when no pipe can be had, reads go through the leg's
`get_buffer`/`buffer_updated` as on the portable path.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Final, cast

from connwatch.proxy.splice.pipes import Pipe, PipePool
from connwatch.proxy.splice.poller import BOTH, IN, OUT, Poller

if TYPE_CHECKING:
    from connwatch.proxy.splice.leg import Leg

__all__ = ["SpliceTransport"]

# Passed positionally (offsets None): keyword parsing was a third of each os.splice call.
_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_WRITE_HIGH: Final = 64 * 1024  # asyncio's default high-water mark until the leg sets its own
# The C close under socket.socket.close: that one is two Python calls (the makefile() reference
# count, unused here) for every socket.
_close_socket: Final = _socket.socket.close
_SHUT_WR: Final = socket.SHUT_WR


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
        "_loop",
        "_lost",
        "_paused",
        "_pipe",
        "_piped",
        "_pipes",
        "_poller",
        "_protocol",
        "_reading",
        "_sink",
        "_sock",
        "_wbuf",
        "_write_paused",
        "_writing",
        "polled",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: _socket.socket,
        protocol: Leg,
        pipes: PipePool,
        chunk: int,
        polled_by: Poller,
    ) -> None:
        # No super().__init__(): its `_extra` dict would be one more allocation per socket.
        self._loop = loop
        self._poller = polled_by  # the loop's (`poller(loop)`, looked up by the data path)
        self.polled = 0  # the poller's note of what is registered for this socket
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
        self._wbuf: bytearray | None = None  # made on the first write that cannot go out at once
        self._writing = False  # registered with add_writer
        self._write_paused = False  # the protocol was told pause_writing()
        self._high = _WRITE_HIGH
        self._eof_out = False  # write_eof() asked for
        self._closing = False
        self._closed = False  # socket closed, connection_lost scheduled
        # connection_lost delivered; None: closed, delivered right after the partner's
        self._lost: bool | None = False
        # Started as it is made (no start() of its own: a Python call fewer a socket): handed to
        # its protocol, then reading unless the protocol paused it. A client leg pauses at once
        # (no upstream yet); the first segment is read all the same, as uvloop does on the
        # portable path: the leg holds it, a PROXY header in it is seen without waiting, and a
        # socket closed before the upstream answers closes with a FIN rather than the RST that
        # unread data would cause.
        protocol.connection_made(self)
        if not self._paused:
            self._want_read()
        elif protocol.sink is None and not self._closing:
            self._read_copy()

    def __repr__(self) -> str:
        return f"<SpliceTransport fd={self._fd} piped={self._piped} closing={self._closing}>"

    # -- asyncio.Transport ----------------------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name in ("peername", "sockname"):  # asked once or twice a connection: not cached
            try:
                return getattr(self._sock, "get" + name)()
            except OSError:
                return default
        return default

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
        if self._reading:
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
        piped = feeder._piped if feeder is not None else 0
        return piped if self._wbuf is None else piped + len(self._wbuf)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._eof_out or not data:
            return
        feeder = self._feeder  # nothing queued or piped for this socket: send at once
        if not self._wbuf and (feeder is None or not feeder._piped):
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
        if self._wbuf is None:
            self._wbuf = bytearray(data)
        else:
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
        feeder = self._feeder  # nothing queued or piped for it: shut down now (else on_writable)
        if not self._wbuf and (feeder is None or not feeder._piped):
            try:  # noqa: SIM105
                self._sock.shutdown(_SHUT_WR)
            except OSError:
                pass  # a peer that already reset shows it on the next read

    def close(self) -> None:
        """Stop reading; close once everything bound for this socket has gone out."""
        if self._closing:
            return
        self._closing = True
        feeder = self._feeder  # anything queued or piped for this socket waits to go out
        if self._wbuf or (feeder is not None and feeder._piped):
            if self._reading:
                self._stop_reader()
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
        self._reading = True
        self._poller.set(self._fd, self, BOTH if self._writing else IN)

    def _stop_reader(self) -> None:
        if self._reading:
            self._reading = False
            self._poller.set(self._fd, self, OUT if self._writing else 0)

    # -- Watched, for the poller ----------------------------------------------------------------
    def on_readable(self) -> None:
        sink = self._sink
        if sink is None:
            self._read_copy()  # no sink yet: the leg holds what arrives (PROXY header, ...)
            return
        if sink._closing:
            self._stop_reader()  # the connection is closing: nothing more can go there
            return
        pipes = self._pipes
        idle = pipes.idle
        if idle:  # take() inline for a pooled pipe: once a read
            pipe = self._pipe = idle.pop()
            pipes.reused += 1
        else:
            try:
                pipe = self._pipe = pipes.take()
            except OSError:
                self._read_copy()  # out of descriptors: copy this chunk through user space
                return
        try:
            n = os.splice(self._fd, pipe[1], self._chunk, None, None, _FLAGS)
        except (BlockingIOError, InterruptedError):
            self._pipe = None
            pipes.give(pipe)
            return
        except OSError as exc:
            self._discard_pipe()
            self._fatal(exc)
            return
        if not n:
            self._pipe = None
            if pipes.takes_back and len(idle) < pipes.max_idle:  # give() inline
                idle.append(pipe)
            else:
                pipes.give(pipe)
            self._read_eof()
            return
        leg = self._protocol
        leg.conn.last_activity = time.monotonic()
        self._piped = n
        if not sink._wbuf:
            # _drain()'s first splice inline: it usually moves everything (once a read).
            try:
                moved = os.splice(pipe[0], sink._fd, n, None, None, _FLAGS)
            except (BlockingIOError, InterruptedError):
                moved = 0
            except OSError as exc:
                self._discard_pipe()
                sink._fatal(exc)
                return
            leg.bytes_in += moved
            if moved == n:
                self._piped = 0
                self._pipe = None
                if pipes.takes_back and len(idle) < pipes.max_idle:  # give() inline
                    idle.append(pipe)
                else:
                    pipes.give(pipe)
                return
            self._piped = n - moved
            if moved > 0 and self._drain():  # room for more, perhaps
                return
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
                n = os.splice(pipe[0], sink._fd, left, None, None, _FLAGS)
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
        self._pipe = None
        pipes = self._pipes
        idle = pipes.idle
        if pipes.takes_back and len(idle) < pipes.max_idle:  # give() inline: once a read
            idle.append(pipe)
        else:
            pipes.give(pipe)
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
        self._eof = True  # no reading resumes from here on
        if not self._protocol.eof_received():
            self.close()
        # Reading stops after the leg has heard: if that closed the transport, the poller just
        # forgot the socket (its close drops it from the epoll set), one epoll_ctl fewer.
        if self._reading:  # _stop_reader() inline: twice a connection
            self._reading = False
            self._poller.set(self._fd, self, OUT if self._writing else 0)

    def _discard_pipe(self) -> None:
        pipe = self._pipe
        if pipe is not None:
            self._pipe = None
            self._piped = 0
            self._pipes.discard(pipe)

    # -- writing side ---------------------------------------------------------------------------
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
            self._writing = True
            self._poller.set(self._fd, self, BOTH if self._reading else OUT)

    def _stop_writer(self) -> None:
        if self._writing:
            self._writing = False
            self._poller.set(self._fd, self, IN if self._reading else 0)

    def on_writable(self) -> None:
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
        assert self._wbuf is not None
        try:
            sent = self._sock.send(self._wbuf)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._fatal(exc)
            return False
        del self._wbuf[:sent]
        if self._wbuf:
            return False
        self._wbuf = None
        return True

    def _shutdown_write(self) -> None:
        # A peer that already reset shows it on the next read, with the right close reason.
        # (try/except, not contextlib.suppress: three Python calls fewer, once per connection)
        try:  # noqa: SIM105
            self._sock.shutdown(_SHUT_WR)
        except OSError:
            pass

    # -- the end --------------------------------------------------------------------------------
    def _fatal(self, exc: OSError) -> None:
        self._closing = True
        self._finish(exc)

    def _finish(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        # _stop_reader(), _stop_writer(), and the pipes' checks inline: once a socket. The
        # socket is closed below, which drops it from the epoll set: no epoll_ctl for that.
        if self._reading or self._writing:
            self._reading = self._writing = False
            self._poller.forget(self._fd, self)
        feeder = self._feeder
        if feeder is not None and feeder._pipe is not None:  # bytes that can no longer arrive
            feeder._discard_pipe()
        sink = self._sink
        if self._pipe is not None and (sink is None or sink._closed):
            self._discard_pipe()  # nobody is left to drain it
        self._wbuf = None
        _close_socket(self._sock)
        partner = self._feeder or sink
        if exc is None and partner is not None and partner._closed and partner._lost is False:
            # The partner's connection_lost is due: this one follows it in the same callback
            # (as the next one scheduled would), one call_soon fewer for most closes.
            self._lost = None
        else:
            self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        partner = self._feeder or self._sink
        try:
            self._protocol.connection_lost(exc)
        finally:
            if partner is not None and partner._lost is None:
                partner._call_connection_lost(None)  # it rode on this callback (see _finish)
            elif partner is None or partner._lost:
                # Both transports of the connection are lost (and so closed: no pipe of either
                # is left to drain): they let go of their legs and of each other, as uvloop's do
                # of their protocol: without these cycles (transport <-> leg, transport <->
                # transport) a closed connection is freed at once, not by the garbage collector.
                self._protocol = None  # type: ignore[assignment]  # never read again
                self._sink = self._feeder = None
                if partner is not None:
                    partner._protocol = None  # type: ignore[assignment]
                    partner._sink = partner._feeder = None
