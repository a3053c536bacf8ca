"""The traffic generator of `connwatch demo`: clients that open, use, idle and close
connections through the demo proxy in every way a real workload does."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import random
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Final

from connwatch.commands.demo.upstream import BYE, FLOOD, LOOPBACK
from connwatch.exceptions import FrameError
from connwatch.wire.heartbeat_frame import FRAME_SIZE, FrameType, decode, ping

__all__ = ["Traffic"]

_MAX_CHURN: Final = 100_000  # short connections per demo run, at most
_MAX_IN_FLIGHT: Final = 8  # short connections open at once, at most
_SHORT_LIMIT: Final = 8.0  # seconds one short connection may take
_STALLED_RCVBUF: Final = 4096  # the stalled reader's receive buffer: its window closes fast
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


async def _pause(stop: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds` or until `stop`; True when stopping."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


async def _close(writer: asyncio.StreamWriter, *, reset: bool = False) -> None:
    if reset:  # SO_LINGER 0: close() sends RST, the proxy sees client_reset
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(2):
            await writer.wait_closed()


def _payload(rng: random.Random, size: int) -> bytes:
    return b"data " + rng.randbytes(size)


class Traffic:
    """Clients of the demo proxy at `port`: long-lived chatty ones, a heartbeat speaker, one
    that goes quiet, one stalled reader, and a churn of short ones ending in different ways.
    Everything stops at `stop`; the churn also stops after _MAX_CHURN connections."""

    def __init__(self, port: int, stop: asyncio.Event, seed: int | None = None) -> None:
        self.port = port
        self.stop = stop
        self.rng = random.Random(seed)
        self.errors: Counter[str] = Counter()
        self.opened = 0

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for size in (512 * 1024, 16 * 1024, 2 * 1024):
                group.create_task(self._forever(functools.partial(self._chatty, size)))
            group.create_task(self._forever(self._heartbeats))
            group.create_task(self._forever(self._quiet))
            group.create_task(self._forever(self._stalled))
            group.create_task(self._churn())

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.opened += 1
        return await asyncio.open_connection(LOOPBACK, self.port)

    async def _forever(self, session: Callable[[], Awaitable[None]]) -> None:
        """Run a long-lived session; if it fails, note why and start over until stopped."""
        while not self.stop.is_set():
            await self._guarded(session)
            await _pause(self.stop, 0.5)

    async def _guarded(self, session: Callable[[], Awaitable[None]]) -> None:
        try:
            await session()
        except (OSError, TimeoutError, EOFError, FrameError) as exc:
            self.errors[type(exc).__name__] += 1

    async def _echo(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int
    ) -> None:
        data = _payload(self.rng, size)
        writer.write(data)
        async with asyncio.timeout(_SHORT_LIMIT):
            await reader.readexactly(len(data))

    async def _chatty(self, size: int) -> None:
        reader, writer = await self._open()
        try:
            while not await _pause(self.stop, self.rng.uniform(0.1, 0.6)):
                await self._echo(reader, writer, self.rng.randint(size // 4, size))
        finally:
            await _close(writer)

    async def _heartbeats(self) -> None:
        """A client speaking the heartbeat protocol (SPEC section 7) through the proxy."""
        reader, writer = await self._open()
        try:
            while not await _pause(self.stop, self.rng.uniform(0.3, 1.0)):
                writer.write(ping())
                async with asyncio.timeout(_SHORT_LIMIT):
                    reply = decode(await reader.readexactly(FRAME_SIZE))
                if reply.type is not FrameType.PONG:
                    raise FrameError("type", f"expected PONG, got {reply.type.name}")
        finally:
            await _close(writer)

    async def _quiet(self) -> None:
        """Says hello once, then holds the connection without a byte: it turns `idle`."""
        reader, writer = await self._open()
        try:
            await self._echo(reader, writer, 16)
            await self.stop.wait()
        finally:
            await _close(writer)

    async def _stalled(self) -> None:
        """Asks for a flood and never reads it: the proxy sees a zero window and pauses."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _STALLED_RCVBUF)
            sock.setblocking(False)
            self.opened += 1
            await loop.sock_connect(sock, (LOOPBACK, self.port))
            await loop.sock_sendall(sock, FLOOD)
            await self.stop.wait()
        finally:
            sock.close()  # unread data: the kernel resets, the proxy sees client_reset

    async def _churn(self) -> None:
        kinds = itertools.cycle(("ping", "hold", "echo", "bye", "hold", "reset", "ping", "hold"))
        running: set[asyncio.Task[None]] = set()
        for _ in range(_MAX_CHURN):
            if await _pause(self.stop, self.rng.uniform(0.1, 0.35)):
                break
            if len(running) >= _MAX_IN_FLIGHT:
                continue
            kind = next(kinds)
            session = functools.partial(self._short, kind)
            task = asyncio.get_running_loop().create_task(self._guarded(session))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.wait(running)

    async def _short(self, kind: str) -> None:
        async with asyncio.timeout(_SHORT_LIMIT):
            reader, writer = await self._open()
            try:
                if kind == "ping":
                    writer.write(ping())
                    decode(await reader.readexactly(FRAME_SIZE))
                elif kind == "bye":  # the upstream closes first: upstream_closed
                    writer.write(BYE)
                    await reader.read()
                elif kind == "hold":  # a short session the table can show
                    for _ in range(self.rng.randint(2, 8)):
                        await self._echo(reader, writer, self.rng.randint(64, 8192))
                        if await _pause(self.stop, self.rng.uniform(0.2, 0.6)):
                            break
                else:
                    await self._echo(reader, writer, self.rng.randint(64, 4096))
            finally:
                await _close(writer, reset=kind == "reset")
