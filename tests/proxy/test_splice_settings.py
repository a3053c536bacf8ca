"""The splice path's per-listener settings and the end of its transports, end to end on loopback."""

from __future__ import annotations

import asyncio
import socket

from connwatch._types import CloseReason
from connwatch.proxy.connection import MonitoredConnection
from connwatch.proxy.legs import ReadBuffer, Timeouts
from connwatch.proxy.sockopts import tcp_options
from connwatch.proxy.splice import PipePool, SplicePath
from tests.proxy.test_splice import Observer, Owner, Proxy, connect, upstream_server


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read())
    writer.close()


async def _upstream_option(proxy: Proxy, level: int, option: int) -> int:
    """The option as read on the upstream socket of the proxy's next connection."""
    seen = len(proxy.observer.opened)
    _, writer = await connect(proxy.port)
    await proxy.observer.until(lambda: len(proxy.observer.opened) > seen)
    value = int(proxy.observer.opened[-1].upstream_socket.getsockopt(level, option))
    writer.close()
    await proxy.observer.wait_closed(seen + 1)
    return value


async def test_a_user_timeout_is_set_and_a_zero_one_left_at_the_kernel_default() -> None:
    async with upstream_server(_echo) as address, Proxy(address) as proxy:
        # Replaced as a reload does (Listener.reconfigure: new options, a new path): the next
        # connect uses them.
        proxy.owner.upstream_options = tcp_options(
            enabled=True, idle=30, interval=5, count=3, user_timeout=2.5
        )
        proxy.path = SplicePath(proxy.owner, proxy.pipes)
        assert await _upstream_option(proxy, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2500
    async with upstream_server(_echo) as address, Proxy(address) as proxy:
        proxy.owner.upstream_options = tcp_options(
            enabled=False, idle=30, interval=5, count=3, user_timeout=0
        )
        proxy.path = SplicePath(proxy.owner, proxy.pipes)
        assert await _upstream_option(proxy, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
        assert await _upstream_option(proxy, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


async def test_both_transports_report_their_loss_and_let_go_after_a_clean_close() -> None:
    async with upstream_server(_echo) as address, Proxy(address) as proxy:
        reader, writer = await connect(proxy.port)
        writer.write(b"ping")
        writer.write_eof()
        assert await reader.read() == b"ping"
        conn = await proxy.observer.wait_closed()
        assert conn.reason is CloseReason.CLIENT_CLOSED  # its EOF came first
        # Both legs heard connection_lost (the connection finished), and both transports let go
        # of their legs: nothing is left for the garbage collector.
        assert conn.client_leg.lost
        assert conn.upstream_leg.lost
        for leg in (conn.client_leg, conn.upstream_leg):
            assert leg.transport is not None
            assert leg.transport.get_protocol() is None
        writer.close()


async def test_connect_in_a_task_the_caller_names_reaches_the_upstream() -> None:
    async with upstream_server(_echo) as address:
        owner = Owner([address], 64 * 1024)
        path = SplicePath(owner, PipePool(64 * 1024))
        conn = MonitoredConnection("0-1", "t", ReadBuffer(64 * 1024), Observer(), Timeouts(0, 0, 0))
        transport, target = await path.connect(
            conn.upstream_protocol, timeout=2, attempts=1, task=asyncio.current_task()
        )
        assert target is owner.pool.targets[0]
        assert target.connecting == 0
        transport.abort()
