"""The heartbeat protocol (SPEC section 7) on asyncio streams; the codec is `wire.heartbeat_frame`.

* `PongResponder` / `start_responder`: answer every PING with its PONG
  (`admin.heartbeat_listen`, the demo upstream).
* `exchange`: one PING/PONG round trip, as the `heartbeat` health check and
  `connwatch probe --type heartbeat` do.

Choices:

* A PONG sent *to* a responder is a protocol error (check "type"). A responder only ever
  receives PINGs; a PONG means the peer is confused about roles (for instance a checker
  pointed at another checker), and saying so beats silently ignoring it.
* A connection that ends in the middle of a frame is a protocol error too (check "length"):
  the peer sent bytes that are not a frame.
* `exchange` validates the reply's timestamp against the PING's (it identifies the PONG) but
  measures RTT on the monotonic clock: the frame's millisecond resolution rounds a loopback
  round trip to 0, and a wall-clock step could make now - timestamp negative.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import cast

from connwatch._types import format_peer
from connwatch.wire.heartbeat_frame import (
    FRAME_SIZE,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    encode,
    now_ms,
    pong_for,
)

ProtocolErrorCallback = Callable[[FrameError, str], None]
"""Called with the error and the peer (`host:port`) when a peer breaks the protocol."""

_CLOSE_GRACE = 1.0  # seconds to wait for a closed socket to finish before aborting it


class PongResponder(asyncio.Protocol):
    """Answers each PING with its PONG; closes the connection at the first bad frame.

    Never raises out of a callback: a bad frame is reported to `on_protocol_error` (if given)
    and the transport closed. Reading pauses while the peer is not reading its PONGs, so a
    flood of PINGs cannot grow the write buffer without bound.
    """

    def __init__(self, on_protocol_error: ProtocolErrorCallback | None = None) -> None:
        self._on_protocol_error = on_protocol_error
        self._decoder = FrameDecoder()
        self._transport: asyncio.Transport | None = None
        self._peer = "unknown"
        self._failed = False  # also set for a well-formed PONG, which the decoder accepts
        self.pings_answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server hands out read/write transports; uvloop's do not subclass
        # asyncio.Transport, so this is a cast rather than an isinstance check.
        self._transport = cast(asyncio.Transport, transport)
        self._peer = format_peer(transport.get_extra_info("peername"))

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._failed:
            return  # already failed: the transport is closing, ignore what is still in flight
        try:
            replies = [self._answer(frame) for frame in self._decoder.feed(data)]
        except FrameError as exc:
            self._fail(exc)
            return
        if replies:
            self._transport.write(b"".join(replies))
        self.pings_answered += len(replies)

    def _answer(self, frame: Frame) -> bytes:
        if frame.type is not FrameType.PING:
            raise FrameError("type", f"a responder only accepts PING, got {frame.type.name}")
        return pong_for(frame)

    def eof_received(self) -> bool | None:
        if not self._failed and self._decoder.pending:
            n = self._decoder.pending
            self._fail(FrameError("length", f"connection ended {n} bytes into a frame"))
        return None  # close our side too, after the PONGs already written are flushed

    def pause_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def _fail(self, error: FrameError) -> None:
        self._failed = True
        transport = self._transport
        if self._on_protocol_error is not None:
            try:
                self._on_protocol_error(error, self._peer)
            except Exception as exc:  # a faulty callback must not break the loop
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "heartbeat on_protocol_error callback failed", "exception": exc}
                )
        if transport is not None:
            transport.close()


async def start_responder(
    host: str,
    port: int,
    *,
    on_protocol_error: ProtocolErrorCallback | None = None,
    sock: socket.socket | None = None,
) -> asyncio.Server:
    """Listen on host:port (port 0 picks one: read it from `server.sockets`) and answer PINGs;
    or on `sock`, a listening socket taken over from an old process (seamless upgrade)."""
    loop = asyncio.get_running_loop()
    if sock is not None:
        return await loop.create_server(lambda: PongResponder(on_protocol_error), sock=sock)
    return await loop.create_server(lambda: PongResponder(on_protocol_error), host, port)


async def exchange(host: str, port: int, *, timeout: float) -> float:
    """One PING/PONG round trip to host:port; returns the RTT in seconds.

    Raises FrameError for a bad reply (including a PONG with another timestamp), TimeoutError
    when connect plus reply take longer than `timeout`, OSError when the connection fails or
    the peer closes without replying. The socket is always closed.
    """
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            return await _round_trip(reader, writer)
    finally:
        if writer is not None:
            await close_writer(writer)


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    sent = Frame(FrameType.PING, now_ms())
    started = time.perf_counter()
    writer.write(encode(sent))
    await writer.drain()
    reply = await _read_frame(reader)
    rtt = time.perf_counter() - started
    if reply.type is not FrameType.PONG:
        raise FrameError("type", f"expected PONG, got {reply.type.name}")
    if reply.timestamp_ms != sent.timestamp_ms:
        raise FrameError(
            "timestamp", f"PONG echoes {reply.timestamp_ms}, the PING sent {sent.timestamp_ms}"
        )
    return rtt


async def _read_frame(reader: asyncio.StreamReader) -> Frame:
    decoder = FrameDecoder()
    while True:
        chunk = await reader.read(FRAME_SIZE - decoder.pending)
        if not chunk:
            if decoder.pending:
                raise FrameError("length", f"reply ended after {decoder.pending} bytes")
            raise ConnectionError("peer closed the connection without replying")
        frames = decoder.feed(chunk)
        if frames:
            return frames[0]


async def close_writer(writer: asyncio.StreamWriter, grace: float = _CLOSE_GRACE) -> None:
    """Close a stream, waiting at most `grace` seconds before aborting it (shared by checks)."""
    writer.close()
    try:
        async with asyncio.timeout(grace):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        writer.transport.abort()  # the peer is gone or stuck; do not wait for it
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
