"""Framing of the upgrade conversation on a Unix stream socket: each message is a 4-byte
big-endian length and that many bytes of JSON; file descriptors ride (SCM_RIGHTS) on the first
`sendmsg` of the message that carries them. Every wait is bounded by the caller's timeout."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
import struct
from typing import Any

from connwatch.exceptions import ConnwatchError
from connwatch.runtime.request_pairs import RequestPairs

PROTOCOL_VERSION = 1
MAX_FDS = 250  # SCM_MAX_FD is 253 on Linux
_MAX_MESSAGE = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")


class UpgradeError(ConnwatchError):
    """The upgrade conversation failed: no socket, a timeout, the peer went away or refused."""


class MessageSocket:
    """One end of an upgrade conversation; one message in flight each way at a time."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._pairs: RequestPairs[dict[str, Any]] = RequestPairs()

    async def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        body = json.dumps(message, separators=(",", ":")).encode()
        data = _HEADER.pack(len(body)) + body
        loop = asyncio.get_running_loop()
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            sent = await self._when_writable(lambda: self.sock.sendmsg([data], ancillary))
            data = data[sent:]
        if data:
            await loop.sock_sendall(self.sock, data)

    async def receive(self) -> tuple[dict[str, Any], list[int]]:
        """The next message and the descriptors that came with it; UpgradeError on EOF."""
        while len(self._buffer) < _HEADER.size or len(self._buffer) < self._wanted():
            await self._read_some()
        size = self._wanted()
        body = bytes(self._buffer[_HEADER.size : size])
        del self._buffer[:size]
        fds, self._fds = self._fds, []
        try:
            message = json.loads(body)
        except ValueError as exc:
            _close_fds(fds)
            raise UpgradeError(f"malformed upgrade message: {exc}") from exc
        if not isinstance(message, dict):
            _close_fds(fds)
            raise UpgradeError("malformed upgrade message: not an object")
        return message, fds

    async def call(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send a request and wait for its answer (no descriptors either way); late answers to
        abandoned requests are skipped (RequestPairs). A request cut off while being sent may be
        half written: the socket is closed then."""

        async def send() -> None:
            await self.send(message)

        return await self._pairs.call(send, self._answer, timeout, unsent=self.close)

    async def _answer(self) -> dict[str, Any]:
        answer, fds = await self.receive()
        _close_fds(fds)
        return answer

    def close(self) -> None:
        _close_fds(self._fds)
        self._fds = []
        self.sock.close()

    def _wanted(self) -> int:
        size: int = _HEADER.unpack_from(self._buffer)[0]
        if size > _MAX_MESSAGE:
            raise UpgradeError(f"upgrade message of {size} bytes is too large")
        return _HEADER.size + size

    async def _read_some(self) -> None:
        data, fds, _flags, _addr = await self._when_readable(
            lambda: socket.recv_fds(self.sock, 256 * 1024, MAX_FDS)
        )
        self._fds.extend(fds)
        if not data:
            raise UpgradeError("the other process closed the upgrade socket")
        self._buffer += data

    async def _when_readable(self, op: Any) -> Any:
        return await self._when(op, readable=True)

    async def _when_writable(self, op: Any) -> Any:
        return await self._when(op, readable=False)

    async def _when(self, op: Any, *, readable: bool) -> Any:
        loop = asyncio.get_running_loop()
        fd = self.sock.fileno()
        while True:
            try:
                return op()
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise UpgradeError(f"upgrade socket: {exc.strerror or exc}") from exc
            ready: asyncio.Future[None] = loop.create_future()
            add, remove = (
                (loop.add_reader, loop.remove_reader)
                if readable
                else (loop.add_writer, loop.remove_writer)
            )
            add(fd, _wake, ready)
            try:
                await ready
            finally:
                remove(fd)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def close_fds(fds: list[int]) -> None:
    _close_fds(fds)


def socket_identity(fd: int) -> tuple[int, int]:
    """(device, inode) of a socket: the same socket held through different descriptors (or by
    different processes) has the same identity."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
