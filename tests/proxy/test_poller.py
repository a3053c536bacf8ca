"""The splice path's epoll poller: readiness, connect, and nothing left registered."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from connwatch.proxy.splice.poller import IN, OUT, Poller, poller
from tests.support import free_port

pytestmark = pytest.mark.both_loops


def _nonblocking() -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    return sock


class _Owner:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.polled = 0
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()

    def on_readable(self) -> None:
        self.readable.set()

    def on_writable(self) -> None:
        self.writable.set()


async def test_reports_readable_and_writable_until_dropped() -> None:
    p = poller(asyncio.get_running_loop())
    a, b = socket.socketpair()
    a.setblocking(False)
    owner = _Owner(a.fileno())
    try:
        p.set(owner.fd, owner, OUT)
        await asyncio.wait_for(owner.writable.wait(), 5)
        assert owner.polled == OUT
        p.set(owner.fd, owner, IN)
        b.send(b"x")
        await asyncio.wait_for(owner.readable.wait(), 5)
        assert len(p) == 1
        p.set(owner.fd, owner, 0)
        assert len(p) == 0
        assert owner.polled == 0
    finally:
        a.close()
        b.close()


async def test_connect_succeeds_refuses_and_unregisters() -> None:
    loop = asyncio.get_running_loop()
    p = Poller(loop)
    server = socket.create_server(("127.0.0.1", 0))
    try:
        for address, expect in (
            (server.getsockname(), None),
            (("127.0.0.1", free_port()), errno.ECONNREFUSED),
        ):
            sock = _nonblocking()
            try:
                if expect is None:
                    await asyncio.wait_for(p.connect(sock, address), 5)
                    assert sock.getpeername() == address
                else:
                    with pytest.raises(ConnectionRefusedError) as info:
                        await asyncio.wait_for(p.connect(sock, address), 5)
                    assert info.value.errno == expect
            finally:
                sock.close()
            assert len(p) == 0
    finally:
        server.close()
        p.close()


async def test_a_cancelled_connect_leaves_nothing_registered() -> None:
    loop = asyncio.get_running_loop()
    p = Poller(loop)
    server = socket.create_server(("127.0.0.1", 0), backlog=0)  # never accepts: SYNs pile up
    socks: list[socket.socket] = []
    try:
        for _ in range(20):  # until the backlog is full and a connect stays pending
            socks.append(sock := _nonblocking())
            try:
                await asyncio.wait_for(p.connect(sock, server.getsockname()), 0.3)
            except TimeoutError:
                break
        else:
            pytest.fail("every connect completed: no pending connect to cancel")
        assert len(p) == 0
    finally:
        for sock in socks:
            sock.close()
        server.close()
        p.close()


async def test_a_connected_socket_is_taken_over_and_a_stale_one_does_not_confuse() -> None:
    """A finished connect leaves its fd in the epoll set, disabled (one-shot); the owner that
    takes the socket over re-arms it. If that socket is closed instead, the next socket with
    the same fd number registers afresh."""
    loop = asyncio.get_running_loop()
    p = Poller(loop)
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    try:
        sock = await asyncio.wait_for(p.connect(_nonblocking(), server.getsockname()), 5)
        assert len(p) == 0
        peer, _ = await loop.sock_accept(server)
        owner = _Owner(sock.fileno())
        p.set(owner.fd, owner, IN)
        peer.send(b"x")
        await asyncio.wait_for(owner.readable.wait(), 5)
        p.set(owner.fd, owner, 0)
        sock.close()
        peer.close()

        stale = await asyncio.wait_for(p.connect(_nonblocking(), server.getsockname()), 5)
        peer, _ = await loop.sock_accept(server)
        number = stale.fileno()
        stale.close()  # never taken over: its dormant entry is stale now
        a, b = socket.socketpair()
        try:
            assert a.fileno() == number  # the lowest free number: the stale one's
            owner = _Owner(a.fileno())
            p.set(owner.fd, owner, IN)
            b.send(b"y")
            await asyncio.wait_for(owner.readable.wait(), 5)
            p.set(owner.fd, owner, 0)
            assert len(p) == 0
        finally:
            a.close()
            b.close()
            peer.close()
    finally:
        server.close()
        p.close()
