"""The portable path's two read paths on real loopback sockets, without a daemon: small reads
through `data_received`, a busy flow through the leg's BulkReader (a BufferedProtocol set on the
transport), and back; bytes, flow control and half-close the same on either."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from connwatch._types import Address, CloseReason, ConnectionState, Direction
from connwatch.proxy.connection import MonitoredConnection
from connwatch.proxy.legs import QUIET_READS, BulkReader, ReadBuffer, Timeouts
from connwatch.proxy.upstream import Target

pytestmark = pytest.mark.both_loops

MiB = 1024 * 1024


class Observer:
    def __init__(self) -> None:
        self.paused: list[Direction] = []
        self.paused_once = asyncio.Event()
        self.closed = asyncio.Event()

    def connection_accepted(self, conn: MonitoredConnection) -> None: ...

    def connection_opened(self, conn: MonitoredConnection) -> None: ...

    def connection_closed(self, conn: MonitoredConnection) -> None:
        self.closed.set()

    def flow_paused(self, conn: MonitoredConnection, direction: Direction) -> None:
        self.paused.append(direction)
        self.paused_once.set()


@dataclass
class Proxied:
    conn: MonitoredConnection
    observer: Observer
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]

    @property
    def client_transport(self) -> asyncio.Transport:
        transport = self.conn.client_leg.transport
        assert transport is not None
        return transport


@asynccontextmanager
async def proxied(buffer_size: int = 256 * 1024) -> AsyncIterator[Proxied]:
    """One connection through a MonitoredConnection on the loop's own transports, wired as the
    listener does (accepted socket wrapped, upstream connected, then `upstream_connected`)."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        loop.create_future()
    )

    async def on_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(on_upstream, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        client = await asyncio.open_connection("127.0.0.1", lsock.getsockname()[1])
        sock, _ = lsock.accept()
    sock.setblocking(False)
    observer = Observer()
    conn = MonitoredConnection("0-1", "t", ReadBuffer(buffer_size), observer, Timeouts(0, 0, 0))
    await loop.connect_accepted_socket(lambda: conn.client_protocol, sock)
    await loop.create_connection(conn.upstream_protocol, "127.0.0.1", up_port)
    conn.upstream_connected(Target(Address("127.0.0.1", up_port)))
    async with server:
        proxy = Proxied(conn, observer, client, await accepted)
        try:
            yield proxy
        finally:
            conn.close(CloseReason.SHUTDOWN, abort=True)
            proxy.client[1].close()
            proxy.upstream[1].close()


def pattern(n: int, salt: int = 0) -> bytes:
    block = bytes((i * 7 + salt) % 251 for i in range(251))
    return (block * (n // len(block) + 1))[:n]


async def test_small_reads_stay_small_a_busy_flow_goes_bulk_and_comes_back() -> None:
    async with proxied() as p:
        (_, c_writer), (u_reader, _) = p.client, p.upstream
        c_writer.write(b"PING\r\n")
        assert await u_reader.readexactly(6) == b"PING\r\n"
        assert p.client_transport.get_protocol() is p.conn.client_leg
        assert p.conn.client_leg.bulk is None

        bulk = pattern(4 * MiB)
        c_writer.write(bulk)
        assert await u_reader.readexactly(len(bulk)) == bulk
        assert isinstance(p.client_transport.get_protocol(), BulkReader)

        for i in range(QUIET_READS):  # one read each: every one is read before the next is sent
            c_writer.write(b"PING %d\r\n" % i)
            assert await u_reader.readexactly(8) == b"PING %d\r\n" % i
        assert p.client_transport.get_protocol() is p.conn.client_leg
        assert p.conn.client_leg.bulk is None
        assert p.conn.bytes_client_to_upstream == 6 + len(bulk) + 8 * QUIET_READS


async def test_a_small_buffer_switches_at_its_own_size() -> None:
    """With a 4 KiB buffer a bulk leg reads 4 KiB at a time; full reads keep it bulk."""
    async with proxied(buffer_size=4096) as p:
        (_, c_writer), (u_reader, _) = p.client, p.upstream
        data = pattern(2 * MiB, salt=3)
        c_writer.write(data)
        assert await u_reader.readexactly(len(data)) == data
        assert isinstance(p.client_transport.get_protocol(), BulkReader)
        assert p.conn.bytes_client_to_upstream == len(data)


async def test_flow_control_and_half_close_on_the_bulk_path() -> None:
    """An upstream that stops reading pauses a bulk client (counted once per pause); once it
    reads again everything arrives; the client's EOF passes through the BulkReader."""
    async with proxied() as p:
        (c_reader, c_writer), (u_reader, u_writer) = p.client, p.upstream
        data = pattern(32 * MiB, salt=5)
        c_writer.write(data)  # the upstream reads nothing yet: its socket and then ours fill
        await asyncio.wait_for(p.observer.paused_once.wait(), 10)
        assert p.observer.paused[0] is Direction.CLIENT_TO_UPSTREAM
        assert isinstance(p.client_transport.get_protocol(), BulkReader)
        c_writer.write_eof()
        assert await u_reader.read() == data  # to EOF: the client's half-close came through
        assert p.conn.state is ConnectionState.HALF_CLOSED
        u_writer.write(b"done")
        u_writer.close()
        assert await c_reader.read() == b"done"
        await asyncio.wait_for(p.observer.closed.wait(), 10)
        assert p.conn.reason is CloseReason.CLIENT_CLOSED
        assert (p.conn.bytes_client_to_upstream, p.conn.bytes_upstream_to_client) == (
            len(data),
            4,
        )
