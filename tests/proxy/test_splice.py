"""The splice data path on real loopback sockets, without a daemon: the proxy here is the
listener's own sequence in miniature (accept → wrap → connect → upstream_connected)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import itertools
import os
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from connwatch._types import CloseReason, ConnectionState, Direction
from connwatch.config import ListenerConfig
from connwatch.exceptions import UpstreamConnectError
from connwatch.proxy.connection import MonitoredConnection
from connwatch.proxy.legs import ReadBuffer, Timeouts
from connwatch.proxy.sockopts import read_keepalive, tcp_options
from connwatch.proxy.splice import SPLICE_AVAILABLE, PipePool, SplicePath, uses_splice
from connwatch.proxy.splice import pipes as splice_pipes
from connwatch.proxy.splice.poller import poller
from connwatch.proxy.upstream import UpstreamPool
from tests.payload import PayloadUpstream, exchange
from tests.support import eventually

pytestmark = [
    pytest.mark.skipif(not SPLICE_AVAILABLE, reason="os.splice is Linux only"),
    pytest.mark.both_loops,
]

MiB = 1024 * 1024
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Observer:
    """The listener's observer role, recording what the connections report."""

    def __init__(self) -> None:
        self.accepted: list[MonitoredConnection] = []
        self.opened: list[MonitoredConnection] = []
        self.closed: list[MonitoredConnection] = []
        self.flow_paused_by: Counter[Direction] = Counter()
        self._changed = asyncio.Event()

    def connection_accepted(self, conn: MonitoredConnection) -> None:
        self.accepted.append(conn)
        self._poke()

    def connection_opened(self, conn: MonitoredConnection) -> None:
        self.opened.append(conn)
        self._poke()

    def connection_closed(self, conn: MonitoredConnection) -> None:
        self.closed.append(conn)
        self._poke()

    def flow_paused(self, conn: MonitoredConnection, direction: Direction) -> None:
        self.flow_paused_by[direction] += 1
        self._poke()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, check: Callable[[], bool], timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                await self._changed.wait()

    async def wait_closed(self, count: int = 1, timeout: float = 10) -> MonitoredConnection:
        await self.until(lambda: len(self.closed) >= count, timeout)
        return self.closed[count - 1]


class Owner:
    """What SplicePath reads from a listener."""

    def __init__(self, upstreams: list[str], buffer_size: int) -> None:
        self.config = ListenerConfig.model_validate(
            {
                "name": "t",
                "listen": "127.0.0.1:0",
                "upstreams": upstreams,
                "buffer_size": buffer_size,
            }
        )
        self.pool = UpstreamPool(self.config.upstreams, self.config.balance)
        keepalive = self.config.keepalive.upstream
        self.upstream_options = tcp_options(
            enabled=keepalive.enabled,
            idle=keepalive.idle,
            interval=keepalive.interval,
            count=keepalive.count,
            user_timeout=keepalive.user_timeout,
        )


class Proxy:
    """A splice proxy on an ephemeral loopback port (or a Unix socket) in front of `upstream`."""

    def __init__(
        self,
        upstream: str,
        *,
        buffer_size: int = 256 * 1024,
        pipes: PipePool | None = None,
        timeouts: Timeouts | None = None,
        unix: Path | None = None,
    ) -> None:
        self.owner = Owner([upstream], buffer_size)
        self.pipes = pipes if pipes is not None else PipePool(min(buffer_size, MiB))
        self.path = SplicePath(self.owner, self.pipes)
        self.observer = Observer()
        self.buffer = ReadBuffer(buffer_size)
        self.timeouts = timeouts or Timeouts(0, 0, 0)
        self.unix = unix
        self.held_back = False  # True: clients wait for `release()` before the upstream connect
        self._release = asyncio.Event()
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._lsock: socket.socket | None = None
        self.connect_errors: list[Exception] = []

    async def __aenter__(self) -> Proxy:
        if self.unix is not None:
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            lsock.bind(str(self.unix))
        else:
            lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lsock.bind(("127.0.0.1", 0))
        lsock.listen(512)
        lsock.setblocking(False)
        self._lsock = lsock
        self._spawn(self._accept_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self.observer.accepted:
            conn.close(CloseReason.SHUTDOWN, abort=True)
        await asyncio.sleep(0)  # let the aborted legs report their loss
        assert self._lsock is not None
        self._lsock.close()
        self.pipes.close()

    @property
    def port(self) -> int:
        assert self._lsock is not None
        return int(self._lsock.getsockname()[1])

    def release(self) -> None:
        self._release.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._lsock is not None
        while True:
            sock, _ = await loop.sock_accept(self._lsock)
            sock.setblocking(False)
            self._spawn(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        conn = MonitoredConnection(
            f"0-{next(self._ids)}", "t", self.buffer, self.observer, self.timeouts
        )
        await self.path.connect_accepted_socket(lambda: conn.client_protocol, sock)
        if self.held_back:
            await self._release.wait()
        try:
            transport, target = await self.path.connect(
                conn.upstream_protocol, timeout=2, attempts=1
            )
        except Exception as exc:  # a failure, not a client left waiting for ever
            self.connect_errors.append(exc)
            conn.close(CloseReason.UPSTREAM_CONNECT_FAILED, abort=True)
            return
        if conn.state is not ConnectionState.CONNECTING:
            transport.abort()
            return
        conn.upstream_connected(target)


@contextlib.asynccontextmanager
async def upstream_server(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    async with server:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


def pattern(n: int, salt: int = 0) -> bytes:
    block = bytes((i * 7 + salt) % 251 for i in range(251))
    return (block * (n // len(block) + 1))[:n]


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- bytes ------------------------------------------------------------------------------------------
async def test_bulk_both_ways_at_once_is_byte_exact_and_counted() -> None:
    async with PayloadUpstream() as upstream, Proxy(upstream.address) as proxy:
        sizes = [(4 * MiB, 4 * MiB)] * 6 + [(3 * MiB + 17, 0), (0, 4 * MiB - 3), (1, 1)]
        results = await asyncio.gather(
            *(exchange(proxy.port, i, s, r) for i, (s, r) in enumerate(sizes))
        )
        await proxy.observer.wait_closed(len(sizes))
        for res, (_, reply) in zip(results, sizes, strict=True):
            assert res.reply_ok
            assert res.reply_len == reply
            got = upstream.received[res.nonce]
            assert (got.nbytes, got.digest) == (res.sent, res.sent_digest)
        counted = sorted(
            (c.bytes_client_to_upstream, c.bytes_upstream_to_client) for c in proxy.observer.closed
        )
        assert counted == sorted((8 + s, r) for s, r in sizes)
        assert {c.reason for c in proxy.observer.closed} == {CloseReason.CLIENT_CLOSED}
        assert proxy.pipes.statistics().created <= 2 * len(sizes)


async def test_many_short_connections_reuse_pipes_and_return_fds_to_baseline() -> None:
    gc.collect()  # pollers of earlier tests' loops close their epoll fds when collected
    poller(asyncio.get_running_loop())  # the loop's one epoll fd: part of the baseline
    async with PayloadUpstream() as upstream:
        baseline = open_fds()
        async with Proxy(upstream.address) as proxy:
            for batch in range(5):
                results = await asyncio.gather(
                    *(exchange(proxy.port, batch * 40 + i, 70_000, 90_000) for i in range(40))
                )
                assert all(r.reply_ok for r in results), proxy.connect_errors
            await proxy.observer.wait_closed(200)
            stats = proxy.pipes.statistics()
            assert stats.reused > stats.created  # pipes go back to the pool and come out again
            assert stats.discarded == 0
            assert stats.idle == stats.created  # every pipe is back, none held by idle legs
            assert proxy.observer.closed[-1].state is ConnectionState.CLOSED
        await asyncio.sleep(0)
        assert open_fds() == baseline


async def test_unix_sockets_on_both_legs(tmp_path: Path) -> None:
    reply = pattern(3 * MiB, 5)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = await reader.read()
        writer.write(reply + got)
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handler, str(tmp_path / "up.sock"))
    async with server, Proxy(f"unix:{tmp_path / 'up.sock'}", unix=tmp_path / "in.sock") as proxy:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "in.sock"))
        request = pattern(2 * MiB, 9)
        writer.write(request)
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert data == reply + request
        conn = await proxy.observer.wait_closed()
        assert conn.client == "unix:"
        assert (conn.bytes_client_to_upstream, conn.bytes_upstream_to_client) == (
            len(request),
            len(reply) + len(request),
        )


# -- half-close and resets --------------------------------------------------------------------------
async def test_half_close_lets_the_upstream_answer_after_client_eof() -> None:
    got_eof = asyncio.Event()
    go_on = asyncio.Event()
    reply = pattern(MiB, 1)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.read() == b"question"
        got_eof.set()
        await go_on.wait()
        writer.write(reply)
        await writer.drain()
        writer.close()

    async with upstream_server(handler) as address, Proxy(address) as proxy:
        reader, writer = await connect(proxy.port)
        writer.write(b"question")
        writer.write_eof()
        await asyncio.wait_for(got_eof.wait(), 5)
        conn = proxy.observer.opened[0]
        assert conn.state is ConnectionState.HALF_CLOSED
        assert conn.half_closed
        go_on.set()
        assert await asyncio.wait_for(reader.read(), 10) == reply
        writer.close()
        closed = await proxy.observer.wait_closed()
        assert closed.reason is CloseReason.CLIENT_CLOSED
        assert closed.bytes_upstream_to_client == len(reply)
        assert closed.bytes_client_to_upstream == len(b"question")


async def test_upstream_that_ends_first_is_named() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        writer.write_eof()
        await reader.read()
        writer.close()

    async with upstream_server(handler) as address, Proxy(address) as proxy:
        reader, writer = await connect(proxy.port)
        assert await asyncio.wait_for(reader.read(), 5) == b"bye"
        writer.close()
        closed = await proxy.observer.wait_closed()
        assert closed.reason is CloseReason.UPSTREAM_CLOSED


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_client_reset_resets_the_upstream() -> None:
    upstream_error: asyncio.Future[BaseException | None] = asyncio.Future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                pass
            upstream_error.set_result(None)
        except ConnectionResetError as exc:
            upstream_error.set_result(exc)

    async with upstream_server(handler) as address, Proxy(address) as proxy:
        _, writer = await connect(proxy.port)
        writer.write(b"x" * 1000)
        await eventually(  # byte counts are polled: they move without an event
            lambda: (
                bool(proxy.observer.opened)
                and proxy.observer.opened[0].bytes_client_to_upstream == 1000
            )
        )
        _reset(writer)
        closed = await proxy.observer.wait_closed()
        assert closed.reason is CloseReason.CLIENT_RESET
        assert isinstance(await asyncio.wait_for(upstream_error, 5), ConnectionResetError)


def _reset_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_client_reset_with_bytes_in_flight_to_it_discards_the_pipe() -> None:
    """The pipe that held bytes bound for a side that reset is closed, never pooled, and the
    reset reaches the other side."""
    upstream_saw: asyncio.Future[BaseException | None] = asyncio.Future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(pattern(8 * MiB))  # the client reads nothing: the proxy backs up
            await reader.read()
            upstream_saw.set_result(None)
        except ConnectionError as exc:
            upstream_saw.set_result(exc)

    async with upstream_server(handler) as address, Proxy(address) as proxy:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        client.connect(("127.0.0.1", proxy.port))
        await proxy.observer.until(
            lambda: proxy.observer.flow_paused_by[Direction.UPSTREAM_TO_CLIENT] > 0
        )
        conn = proxy.observer.opened[0]
        assert conn.client_leg.write_buffer > 0  # bytes wait in a pipe for the client
        _reset_socket(client)
        closed = await proxy.observer.wait_closed()
        assert closed.reason is CloseReason.CLIENT_RESET
        assert isinstance(await asyncio.wait_for(upstream_saw, 5), ConnectionResetError)
        stats = proxy.pipes.statistics()
        # The pipe holding bytes for the client, and the one its failed read was going into.
        assert stats.discarded in (1, 2)
        assert stats.idle == stats.created - stats.discarded


async def test_a_discarded_pipe_leaks_nothing_into_the_next_connection() -> None:
    """One pipe in the pool: the first connection dies holding bytes in it; the second must
    see exactly its own bytes."""
    first = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            if not first.is_set():
                first.set()
                writer.write(b"L" * (4 * MiB))
                await reader.read()
                return
            writer.write(b"clean")
            writer.write_eof()
            await reader.read()
            writer.close()

    pipes = PipePool(256 * 1024, max_idle=1)
    async with upstream_server(handler) as address, Proxy(address, pipes=pipes) as proxy:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        client.connect(("127.0.0.1", proxy.port))
        await proxy.observer.until(lambda: sum(proxy.observer.flow_paused_by.values()) > 0)
        _reset_socket(client)
        await proxy.observer.wait_closed()
        reader, writer = await connect(proxy.port)
        assert await asyncio.wait_for(reader.read(), 5) == b"clean"
        writer.close()
        await proxy.observer.wait_closed(2)
        assert pipes.statistics().discarded >= 1


# -- flow control ------------------------------------------------------------------------------------
async def test_slow_reader_bounds_what_is_held_and_loses_nothing() -> None:
    total = 64 * MiB
    chunk = pattern(256 * 1024, 3)
    sent_all = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.close()
        sent_all.set()

    buffer_size = 128 * 1024
    async with (
        upstream_server(handler) as address,
        Proxy(address, buffer_size=buffer_size) as proxy,
    ):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.connect(("127.0.0.1", proxy.port))
        await proxy.observer.until(
            lambda: proxy.observer.flow_paused_by[Direction.UPSTREAM_TO_CLIENT] > 0
        )
        conn = proxy.observer.opened[0]
        held = []
        for _ in range(20):  # while nobody reads, nothing more piles up in the proxy
            held.append(conn.unsent())
            await asyncio.sleep(0.01)
        assert max(held) <= buffer_size
        assert not sent_all.is_set()
        received = await asyncio.to_thread(_read_all, client, chunk)
        assert received == total
        closed = await proxy.observer.wait_closed()
        assert closed.bytes_upstream_to_client == total
        assert closed.reason is CloseReason.UPSTREAM_CLOSED


def _read_all(sock: socket.socket, chunk: bytes) -> int:
    n = 0
    expect = memoryview(chunk * 2)
    with sock:
        while data := sock.recv(MiB):
            start = n % len(chunk)
            while data:
                piece = data[: len(chunk) - start]
                assert piece == expect[start : start + len(piece)], f"mismatch at {n}"
                n += len(piece)
                data = data[len(piece) :]
                start = 0
    return n


# -- before the upstream, and without pipes ---------------------------------------------------------
async def test_bytes_before_the_upstream_connects_are_held_then_sent_first() -> None:
    got: asyncio.Future[bytes] = asyncio.Future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.set_result(await reader.read())
        writer.close()

    async with upstream_server(handler) as address, Proxy(address) as proxy:
        proxy.held_back = True
        _, writer = await connect(proxy.port)
        writer.write(b"early;")
        await proxy.observer.until(lambda: bool(proxy.observer.accepted))
        conn = proxy.observer.accepted[0]
        transport = conn.client_transport()
        assert transport is not None
        transport.resume_reading()  # as a PROXY header read does: no sink yet, so bytes are held
        await eventually(lambda: conn.peek_held() == b"early;", timeout=5)
        proxy.release()
        await proxy.observer.until(lambda: bool(proxy.observer.opened))
        writer.write(b"late")
        writer.write_eof()
        assert await asyncio.wait_for(got, 5) == b"early;late"
        writer.close()
        closed = await proxy.observer.wait_closed()
        assert closed.bytes_client_to_upstream == len(b"early;late")


class NoPipes(PipePool):
    """A pool that behaves as if the process were out of file descriptors."""

    def take(self) -> tuple[int, int]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


async def test_without_pipes_bytes_are_copied_and_still_exact() -> None:
    async with PayloadUpstream() as upstream, Proxy(upstream.address, pipes=NoPipes(MiB)) as proxy:
        results = await asyncio.gather(
            *(exchange(proxy.port, i, 6 * MiB + i, 4 * MiB - i) for i in range(3))
        )
        for res in results:
            assert res.reply_ok
            assert upstream.received[res.nonce].digest == res.sent_digest
        await proxy.observer.wait_closed(3)
        assert sum(c.bytes_upstream_to_client for c in proxy.observer.closed) == 12 * MiB - 3


# -- timers, connect, pool ---------------------------------------------------------------------------
async def test_idle_timeout_closes_and_releases_everything() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async with (
        upstream_server(handler) as address,
        Proxy(address, timeouts=Timeouts(0.2, 0, 0)) as proxy,
    ):
        reader, writer = await connect(proxy.port)
        writer.write(b"hello")
        closed = await proxy.observer.wait_closed(timeout=5)
        assert closed.reason is CloseReason.IDLE_TIMEOUT
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert proxy.pipes.statistics().idle == proxy.pipes.statistics().created


async def test_connect_failure_tries_each_attempt_and_counts() -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    owner = Owner([dead], 64 * 1024)
    path = SplicePath(owner, PipePool(64 * 1024))
    with pytest.raises(UpstreamConnectError, match="Connection refused"):
        await path.connect(lambda: asyncio.BufferedProtocol(), timeout=1, attempts=3)
    assert owner.pool.targets[0].connect_failures == 3


async def test_hostname_upstream_is_resolved() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())
        writer.close()

    async with upstream_server(handler) as address:
        port = address.rsplit(":", 1)[1]
        async with Proxy(f"localhost:{port}") as proxy:
            reader, writer = await connect(proxy.port)
            writer.write(b"ping")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"ping"
            writer.close()
            await proxy.observer.wait_closed()


async def test_pipe_pool_gives_back_clean_pipes_and_closes_the_rest() -> None:
    pool = PipePool(128 * 1024, max_idle=1)
    a = pool.take()
    b = pool.take()
    pool.give(a)
    pool.give(b)  # over max_idle: closed
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(b[0])
    assert pool.take() == a
    os.write(a[1], b"left over")
    pool.discard(a)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(a[0])
    c = pool.take()
    with pytest.raises(BlockingIOError):
        os.read(c[0], 100)  # a fresh pipe is empty
    pool.give(c)
    pool.close()
    stats = pool.statistics()
    assert (stats.idle, stats.created, stats.reused, stats.discarded) == (0, 3, 1, 1)


async def test_idle_pipes_are_closed_when_none_was_taken_for_a_while() -> None:
    gc.collect()  # pollers of earlier tests' loops close their epoll fds when collected
    poller(asyncio.get_running_loop())  # the loop's one epoll fd: part of the baseline
    async with PayloadUpstream() as upstream:
        baseline = open_fds()
        pipes = PipePool(256 * 1024, idle_timeout=0.3)
        async with Proxy(upstream.address, pipes=pipes) as proxy:
            results = await asyncio.gather(*(exchange(proxy.port, i, MiB, MiB) for i in range(4)))
            assert all(r.reply_ok for r in results)
            await proxy.observer.wait_closed(4)
            assert pipes.statistics().idle > 0
            await eventually(lambda: pipes.statistics().idle == 0, timeout=5)
            assert open_fds() == baseline + 1  # only the proxy's listening socket


async def test_short_of_descriptors_no_pipe_is_made_or_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(splice_pipes, "_pressure_until", 0.0)  # restored afterwards
    pool = PipePool(64 * 1024)
    pipe = pool.take()
    splice_pipes.note_fd_pressure()  # as when a socket() or pipe2() fails with EMFILE
    assert splice_pipes.fd_pressure()
    with pytest.raises(OSError, match="descriptors are short"):
        pool.take()  # legs copy through user space meanwhile
    pool.give(pipe)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(pipe[0])  # closed, not pooled
    assert pool.statistics().idle == 0


async def test_transports_give_back_directly_only_while_the_pool_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(splice_pipes, "_pressure_until", 0.0)  # restored afterwards
    pool = PipePool(64 * 1024)
    assert not pool.takes_back  # no trim timer yet: the first return goes through give()
    a, b = pool.take(), pool.take()
    pool.give(a)
    assert pool.takes_back
    splice_pipes.note_fd_pressure()
    assert not pool.takes_back  # short of descriptors: give() decides (and closes)
    pool.give(b)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(b[0])
    pool.close()
    assert not pool.takes_back


def test_data_path_choice() -> None:
    assert not uses_splice("portable")
    assert uses_splice("splice")
    assert uses_splice("auto") == SPLICE_AVAILABLE


async def test_upstream_socket_carries_keepalive_and_nodelay() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async with upstream_server(handler) as address, Proxy(address) as proxy:
        _, writer = await connect(proxy.port)
        await proxy.observer.until(lambda: bool(proxy.observer.opened))
        sock = proxy.observer.opened[0].upstream_socket
        readback = read_keepalive(sock)
        assert readback is not None
        assert (readback.enabled, readback.idle_s, readback.interval_s, readback.count) == (
            True,
            60,
            10,
            5,
        )
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        await proxy.observer.wait_closed()
