"""Back-pressure between the legs of one connection: with transports that record what they are
told (uvloop calls pause_writing() from inside write(), as these do), and end to end."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from connwatch._types import Address, ConnectionState, Direction
from connwatch.proxy.connection import MonitoredConnection
from connwatch.proxy.legs import ReadBuffer, Timeouts
from connwatch.proxy.upstream import Target
from tests.support import DaemonProcess, daemon_config, listener_config

MiB = 1024 * 1024
CHUNK = b"w" * (256 * 1024)


class Observer:
    def __init__(self) -> None:
        self.paused: list[Direction] = []

    def connection_accepted(self, conn: MonitoredConnection) -> None: ...

    def connection_opened(self, conn: MonitoredConnection) -> None: ...

    def connection_closed(self, conn: MonitoredConnection) -> None: ...

    def flow_paused(self, conn: MonitoredConnection, direction: Direction) -> None:
        self.paused.append(direction)


class Transport:
    """Queues every write; tells its protocol to pause past the high-water mark, as uvloop does."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.reading = True
        self.queued = 0
        self.high = 64 * 1024
        self.protocol_paused = False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = self.high if high is None else high

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.queued += len(data)
        if self.queued > self.high and not self.protocol_paused:
            self.protocol_paused = True
            self.protocol.pause_writing()

    def drain(self) -> None:
        """The peer took everything: below the low-water mark, the protocol may resume."""
        self.queued = 0
        if self.protocol_paused:
            self.protocol_paused = False
            self.protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self.queued

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True


def test_held_bytes_that_fill_the_upstream_keep_the_client_paused() -> None:
    """Client bytes held while the upstream connects can fill the upstream's queue at once
    (seen under CPU load: uvloop reads again after pause_reading). The client must then stay
    paused until the upstream drains; resuming it there read 256 MiB into memory."""
    observer = Observer()
    conn = MonitoredConnection("0-1", "t", ReadBuffer(1024), cast(Any, observer), Timeouts(0, 0, 0))
    client = Transport(conn.client_leg)
    conn.client_leg.connection_made(cast(Any, client))
    assert not client.reading  # paused until the upstream is there
    conn.hold(b"x" * 4096)  # more than the 1 KiB high-water mark of the upstream leg
    upstream = Transport(conn.upstream_leg)
    conn.upstream_leg.connection_made(cast(Any, upstream))
    conn.upstream_connected(cast(Any, object()))
    assert upstream.queued == 4096
    assert not client.reading
    assert observer.paused == [Direction.CLIENT_TO_UPSTREAM]
    upstream.drain()
    assert client.reading


def test_client_reads_once_the_upstream_is_there_when_nothing_fills_it() -> None:
    conn = MonitoredConnection(
        "0-2", "t", ReadBuffer(1024), cast(Any, Observer()), Timeouts(0, 0, 0)
    )
    client = Transport(conn.client_leg)
    conn.client_leg.connection_made(cast(Any, client))
    conn.hold(b"hello")
    upstream = Transport(conn.upstream_leg)
    conn.upstream_leg.connection_made(cast(Any, upstream))
    conn.upstream_connected(cast(Any, object()))
    assert upstream.queued == 5
    assert client.reading


def test_statistics_is_a_frozen_record_of_the_connection() -> None:
    conn = MonitoredConnection(
        "0-3", "t", ReadBuffer(1024), cast(Any, Observer()), Timeouts(0, 0, 0)
    )
    conn.client_leg.connection_made(cast(Any, Transport(conn.client_leg)))
    conn.upstream_leg.connection_made(cast(Any, Transport(conn.upstream_leg)))
    conn.upstream_connected(Target(Address("127.0.0.1", 9)))
    conn.client_leg.buffer_updated(4)
    conn.upstream_leg.buffer_updated(2)
    now = conn.last_activity + 1.5
    stats = conn.statistics(now)
    assert (stats.id, stats.listener, stats.client, stats.upstream) == (
        "0-3",
        "t",
        "127.0.0.1:40000",
        "127.0.0.1:9",
    )
    assert (stats.bytes_client_to_upstream, stats.bytes_upstream_to_client) == (4, 2)
    assert stats.state is ConnectionState.OPEN
    assert stats.reason is None
    assert not stats.half_closed
    assert stats.age == conn.age(now)
    assert stats.idle == 1.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.id = "other"  # type: ignore[misc]
    conn.client_leg.buffer_updated(1)
    assert stats.bytes_client_to_upstream == 4  # a snapshot: later reads do not change it


async def test_a_stalled_upstream_holds_back_a_fast_client_under_cpu_load(tmp_path: Path) -> None:
    """End to end on real sockets. The held-bytes race needs the daemon to fall behind its
    client, so a second process keeps a core busy meanwhile (killed at the end)."""
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []  # never read

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append((reader, writer))  # the reader too: a collected one drops what arrives

    server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    burner = await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
    try:
        async with (
            server,
            DaemonProcess(tmp_path, daemon_config(listener_config("app", [address]))) as daemon,
        ):
            for attempt in range(3):  # each a fresh connection: the race is at its start
                _, writer = await asyncio.open_connection("127.0.0.1", daemon.port("app"))
                sent = 0
                try:
                    while sent < 128 * MiB:
                        writer.write(CHUNK)
                        sent += len(CHUNK)
                        try:
                            async with asyncio.timeout(0.5):
                                await writer.drain()
                        except TimeoutError:
                            break  # back-pressure reached the client
                    assert sent < 64 * MiB, f"attempt {attempt}: {sent} bytes taken, none passed on"
                finally:
                    writer.transport.abort()
    finally:
        burner.kill()
        await burner.wait()
        for _, w in held:
            w.transport.abort()
