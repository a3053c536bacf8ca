"""The built-in upstream of `connwatch demo`: echo, heartbeat PONGs, a flood, a quick close.

A connection's first bytes pick what it gets, so the traffic generator can make every
connection state show in the live table without another service.
"""

from __future__ import annotations

import asyncio
from typing import Final, cast

from connwatch.health.heartbeat_io import PongResponder
from connwatch.wire.heartbeat_frame import MAGIC

__all__ = ["BYE", "FLOOD", "FLOOD_LIMIT", "LOOPBACK", "DemoUpstream"]

LOOPBACK: Final = "127.0.0.1"
FLOOD: Final = b"FLOOD\n"  # first bytes that make the upstream push data without end
BYE: Final = b"BYE\n"  # first bytes that make the upstream close at once
FLOOD_LIMIT: Final = 64 * 1024 * 1024  # bytes one flood sends at most
_MAGIC_BYTES: Final = MAGIC.to_bytes(4, "big")
_CHUNK: Final = b"connwatch demo flood " * 3120  # ~64 KiB
_MODES: Final = ((_MAGIC_BYTES, "frames"), (FLOOD, "flood"), (BYE, "bye"))


def _pick_mode(head: bytes) -> str | None:
    """The mode the first bytes ask for; None while they are still a prefix of a command."""
    undecided = False
    for prefix, mode in _MODES:
        if head.startswith(prefix):
            return mode
        undecided = undecided or prefix.startswith(head)
    return None if undecided else "echo"


class _UpstreamProtocol(asyncio.Protocol):
    """One upstream connection. Its first bytes pick the mode: the heartbeat magic -> answer
    PINGs with PONGs; FLOOD -> push data until the peer stops reading (or FLOOD_LIMIT);
    BYE -> close at once; anything else -> echo."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._head = b""
        self._mode: str | None = None
        self._pong: PongResponder | None = None
        self._paused = False
        self._sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it: a cast.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._mode is None:
            self._head += data
            self._mode = _pick_mode(self._head)
            if self._mode is None:
                return
            data, self._head = self._head, b""
            if self._mode == "frames":
                self._pong = PongResponder()
                self._pong.connection_made(transport)
            elif self._mode == "flood":
                self._pump()
            elif self._mode == "bye":
                transport.close()
        if self._mode == "echo":
            transport.write(data)
        elif self._pong is not None:
            self._pong.data_received(data)

    def eof_received(self) -> bool | None:
        if self._pong is not None:
            return self._pong.eof_received()
        return None

    def pause_writing(self) -> None:
        self._paused = True
        if self._pong is not None:
            self._pong.pause_writing()
        elif self._transport is not None and self._mode == "echo":
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._pong is not None:
            self._pong.resume_writing()
        elif self._transport is not None and self._mode == "echo":
            self._transport.resume_reading()
        elif self._mode == "flood":
            self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pong is not None:
            self._pong.connection_lost(exc)
        self._transport = None

    def _pump(self) -> None:
        """Write until the transport's buffer is full (pause_writing) or the flood is spent."""
        while self._transport is not None and not self._paused and self._sent < FLOOD_LIMIT:
            self._transport.write(_CHUNK)
            self._sent += len(_CHUNK)


class DemoUpstream:
    """The demo's upstream server on 127.0.0.1 (port 0 picks one)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> DemoUpstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(_UpstreamProtocol, LOOPBACK, port)
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"{LOOPBACK}:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
