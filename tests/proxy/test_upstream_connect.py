"""UpstreamPool.connect on loopback: socket options, failover over attempts, counts, fd marks."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from connwatch._types import Address
from connwatch.exceptions import UpstreamConnectError
from connwatch.proxy.fd_watch import FdWatch
from connwatch.proxy.sockopts import for_loop_socket, tcp_options
from connwatch.proxy.upstream import UpstreamPool

KEEPALIVE = tcp_options(enabled=True, idle=42, interval=7, count=3, user_timeout=0)


@asynccontextmanager
async def listening() -> AsyncIterator[Address]:
    """A loopback server that accepts and holds its clients."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield Address("127.0.0.1", server.sockets[0].getsockname()[1])
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def refused() -> Address:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return Address("127.0.0.1", sock.getsockname()[1])


async def test_a_connect_sets_the_options_and_counts_its_duration() -> None:
    async with listening() as address:
        pool = UpstreamPool((address,), "round_robin")
        transport, target = await pool.connect(
            asyncio.Protocol, timeout=2.0, attempts=1, options=for_loop_socket(KEEPALIVE)
        )
        try:
            sock = transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 42
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 7
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert target.label == str(address)
            assert target.connect_duration.snapshot().count == 1
            assert (target.connecting, target.connect_failures) == (0, 0)
        finally:
            transport.close()


async def test_a_refused_target_is_counted_and_the_next_one_tried() -> None:
    dead = refused()
    async with listening() as alive:
        pool = UpstreamPool((dead, alive), "first")
        failed: list[str] = []
        pool.on_connect_failure = failed.append
        transport, target = await pool.connect(asyncio.Protocol, timeout=2.0, attempts=2)
        transport.close()
        assert target.address == alive
        first = pool.targets[0]
        assert (first.connect_failures, first.connecting) == (1, 0)
        assert first.connect_duration.snapshot().count == 0
        assert failed == [str(dead)]


async def test_every_try_failing_says_each_target_in_one_error() -> None:
    one, two = refused(), refused()
    pool = UpstreamPool((one, two), "first")
    with pytest.raises(UpstreamConnectError) as caught:
        await pool.connect(asyncio.Protocol, timeout=2.0, attempts=3)
    assert str(caught.value).count(str(one)) == 2  # tries go round the targets again
    assert str(caught.value).count(str(two)) == 1
    assert not caught.value.out_of_fds
    assert [t.connect_failures for t in pool.targets] == [2, 1]


async def test_an_upstream_fd_over_the_mark_is_shown_to_the_fd_watch() -> None:
    short: list[bool] = []
    fds = FdWatch(lambda: short.append(True), lambda: short.append(False))
    fds.high = 3  # every new socket's number is over it
    async with listening() as address:
        pool = UpstreamPool((address,), "first")
        transport, _ = await pool.connect(asyncio.Protocol, timeout=2.0, attempts=1, fds=fds)
        transport.close()
    assert short == [True]
