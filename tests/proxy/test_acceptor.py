"""Acceptor: the loop's own server while fds are plenty, our accept loop once they run short."""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

from connwatch._types import Address
from connwatch.proxy.acceptor import Acceptor
from connwatch.proxy.binding import bind_tcp
from connwatch.proxy.fd_watch import FdWatch
from tests.support import eventually


class _Made(asyncio.Protocol):
    """Records which path made a client's transport."""

    def __init__(self, paths: asyncio.Queue[str]) -> None:
        self.paths = paths

    def connection_made(self, transport: Any) -> None:
        self.paths.put_nowait("loop")
        transport.close()


def _acceptor(paths: asyncio.Queue[str]) -> Acceptor:
    sock = bind_tcp(Address(host="127.0.0.1", port=0))

    def on_socket(conn: socket.socket, peer: Any) -> None:
        paths.put_nowait("own")
        conn.close()

    return Acceptor(sock, on_socket, "t", factory=lambda: _Made(paths))


@contextlib.asynccontextmanager
async def _serving() -> AsyncIterator[tuple[Acceptor, asyncio.Queue[str]]]:
    """An acceptor started and handed to the loop's server (fds plenty); closed at the end."""
    paths: asyncio.Queue[str] = asyncio.Queue()
    acceptor = _acceptor(paths)
    acceptor.start()
    try:
        await eventually(lambda: acceptor.by_loop)
        yield acceptor, paths
    finally:
        acceptor.close()


async def _path_of_next_client(acceptor: Acceptor, paths: asyncio.Queue[str]) -> str:
    _reader, writer = await asyncio.open_connection(*acceptor.sock.getsockname()[:2])
    try:
        return await asyncio.wait_for(paths.get(), 5)
    finally:
        writer.close()


async def test_the_loop_server_accepts_while_fds_are_plenty_and_hands_back_when_short() -> None:
    async with _serving() as (acceptor, paths):
        assert await _path_of_next_client(acceptor, paths) == "loop"
        acceptor.fds.moved(acceptor.fds.mark_high)  # an upstream fd numbered at the mark
        assert not acceptor.by_loop
        assert [await _path_of_next_client(acceptor, paths) for _ in range(3)] == ["own"] * 3
        acceptor.fds.moved(acceptor.fds.mark_low - 1)  # well below: plenty again
        await eventually(lambda: acceptor.by_loop)
        assert await _path_of_next_client(acceptor, paths) == "loop"


async def test_an_upstream_emfile_hands_accepting_back_to_our_loop() -> None:
    async with _serving() as (acceptor, paths):
        acceptor.exhausted(OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
        assert not acceptor.by_loop
        assert acceptor.fds.short
        acceptor.served()  # the burst ends; fds are still short until a low fd is seen
        assert await _path_of_next_client(acceptor, paths) == "own"  # after the retry pause
        assert not acceptor.by_loop
        acceptor.fds.moved(acceptor.fds.mark_low - 1)  # fds plenty again: the loop's server
        await eventually(lambda: acceptor.by_loop)


async def test_a_table_filled_by_other_sockets_is_seen_within_a_second() -> None:
    async with _serving() as (acceptor, paths):
        # As if every fd up to the mark were taken by sockets no connection reports.
        acceptor.fds.high = 0
        await eventually(lambda: not acceptor.by_loop, timeout=3)
        assert acceptor.fds.short
        assert await _path_of_next_client(acceptor, paths) == "own"


async def test_a_reload_without_a_factory_accepts_here_and_back_with_one() -> None:
    async with _serving() as (acceptor, paths):
        acceptor.serve_with(None)  # a reload to the splice data path
        assert not acceptor.by_loop
        assert await _path_of_next_client(acceptor, paths) == "own"
        acceptor.serve_with(lambda: _Made(paths))  # and back to the portable one
        await eventually(lambda: acceptor.by_loop)
        assert await _path_of_next_client(acceptor, paths) == "loop"


async def test_accepted_sockets_are_plain_only_for_a_data_path_that_wraps_them() -> None:
    """Splice takes the C `_socket.socket`; the loop's transports need a socket.socket (uvloop
    closes any other file object itself, after libuv closed its fd). A reload switches."""
    kinds: asyncio.Queue[type] = asyncio.Queue()

    def on_socket(conn: _socket.socket, peer: Any) -> None:
        kinds.put_nowait(type(conn))
        conn.close()

    acceptor = Acceptor(bind_tcp(Address(host="127.0.0.1", port=0)), on_socket, "t", plain=True)
    acceptor.start()
    address = acceptor.sock.getsockname()[:2]

    async def next_kind() -> type:
        _reader, writer = await asyncio.open_connection(*address)
        writer.close()
        return await asyncio.wait_for(kinds.get(), 5)

    try:
        assert await next_kind() is _socket.socket
        acceptor.serve_with(None, plain=False)  # a reload to the portable data path
        kind = await next_kind()
        assert issubclass(kind, socket.socket)
        assert kind.family is socket.AF_INET  # a constant: no enum conversion each time
        acceptor.serve_with(None, plain=True)  # and back to splice
        assert await next_kind() is _socket.socket
    finally:
        acceptor.close()


async def test_close_stops_both_ways_of_accepting() -> None:
    paths: asyncio.Queue[str] = asyncio.Queue()
    acceptor = _acceptor(paths)
    acceptor.start()
    await eventually(lambda: acceptor.by_loop)
    address = acceptor.sock.getsockname()[:2]
    acceptor.close()
    assert not acceptor.by_loop
    try:
        _, writer = await asyncio.open_connection(*address)
    except ConnectionRefusedError:
        return
    writer.close()
    raise AssertionError("the closed listener still accepts")


def test_fd_watch_turns_short_at_the_high_mark_and_plenty_below_the_low_one() -> None:
    events: list[str] = []
    watch = FdWatch(lambda: events.append("short"), lambda: events.append("plenty"))
    assert watch.mark_low < watch.mark_high
    watch.moved(watch.mark_high - 1)
    assert events == []
    assert not watch.short
    watch.moved(watch.mark_high)
    watch.moved(watch.mark_high + 5)
    assert events == ["short"]
    assert watch.short
    watch.moved(watch.mark_low)  # between the marks: still short (no flapping)
    assert events == ["short"]
    watch.moved(watch.mark_low - 1)
    assert events == ["short", "plenty"]
    assert not watch.short
