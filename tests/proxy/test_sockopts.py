"""sockopts on live loopback sockets, as asyncio and uvloop transports hand them out."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop

from connwatch.proxy.sockopts import (
    KeepaliveReadback,
    SocketLike,
    apply_keepalive,
    is_tcp,
    read_keepalive,
    set_nodelay,
)

Runner = Callable[[Callable[[], Awaitable[None]]], None]
KEEPALIVE: dict[str, Any] = {
    "enabled": True,
    "idle": 59.2,
    "interval": 0.25,
    "count": 4,
    "user_timeout": 1.1,
}


@pytest.fixture(params=["asyncio", "uvloop"])
def run_in_loop(request: pytest.FixtureRequest) -> Runner:
    """Runs a test body in a fresh event loop of each kind."""
    factory = asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop

    def run(body: Callable[[], Awaitable[None]]) -> None:
        async def bounded() -> None:
            await asyncio.wait_for(body(), timeout=10)

        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(bounded())

    return run


class _Tracking(asyncio.Protocol):
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        # BaseTransport: uvloop's TCPTransport does not subclass asyncio.Transport.
        self.made: asyncio.Future[asyncio.BaseTransport] = loop.create_future()
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.set_result(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


@asynccontextmanager
async def transport_pair(
    unix_path: str | None = None,
) -> AsyncIterator[tuple[_Tracking, _Tracking]]:
    """A connected (client, server) pair of protocols over loopback TCP or a Unix socket."""
    loop = asyncio.get_running_loop()
    server_side = _Tracking()
    sides = [server_side]
    if unix_path is None:
        server = await loop.create_server(lambda: server_side, "127.0.0.1", 0)
    else:
        server = await loop.create_unix_server(lambda: server_side, unix_path)
    # Everything opened is closed even when the body fails: uvloop's loop.close() can hang on
    # a transport left open while ResourceWarning is an error.
    try:
        if unix_path is None:
            port = server.sockets[0].getsockname()[1]
            _, client_side = await loop.create_connection(_Tracking, "127.0.0.1", port)
        else:
            _, client_side = await loop.create_unix_connection(_Tracking, unix_path)
        sides.insert(0, client_side)
        await server_side.made
        yield client_side, server_side
    finally:
        for side in sides:
            if side.made.done():
                side.made.result().close()
                await side.lost.wait()
        server.close()
        await server.wait_closed()


def socket_of(side: _Tracking) -> SocketLike:
    sock: SocketLike = side.made.result().get_extra_info("socket")
    return sock


def test_transport_sockets_are_pseudo_sockets_recognised_as_tcp(run_in_loop: Runner) -> None:
    async def body() -> None:
        async with transport_pair() as (client, _):
            sock = socket_of(client)
            # Guards the point of the two-loop fixture: neither is a plain socket.socket.
            assert not isinstance(sock, socket.socket)
            assert type(sock).__name__ in {"TransportSocket", "PseudoSocket"}
            assert is_tcp(sock)

    run_in_loop(body)


def test_keepalive_settings_read_back_rounded_to_kernel_units(run_in_loop: Runner) -> None:
    async def body() -> None:
        async with transport_pair() as (client, server):
            for side in (client, server):
                sock = socket_of(side)
                apply_keepalive(sock, **KEEPALIVE)
                assert read_keepalive(sock) == KeepaliveReadback(
                    enabled=True, idle_s=60, interval_s=1, count=4, user_timeout_ms=1100
                )

    run_in_loop(body)


def test_keepalive_can_be_disabled_and_user_timeout_reset_to_kernel_default(
    run_in_loop: Runner,
) -> None:
    async def body() -> None:
        async with transport_pair() as (client, _):
            sock = socket_of(client)
            apply_keepalive(sock, **KEEPALIVE)
            apply_keepalive(sock, **{**KEEPALIVE, "enabled": False, "user_timeout": 0})
            readback = read_keepalive(sock)
            assert readback is not None
            assert not readback.enabled
            assert readback.user_timeout_ms == 0

    run_in_loop(body)


def test_keepalive_clamps_to_kernel_limits(run_in_loop: Runner) -> None:
    async def body() -> None:
        async with transport_pair() as (client, _):
            sock = socket_of(client)
            apply_keepalive(
                sock, enabled=True, idle=36_000, interval=0, count=1000, user_timeout=0.0004
            )
            assert read_keepalive(sock) == KeepaliveReadback(True, 32767, 1, 127, 1)

    run_in_loop(body)


def test_set_nodelay_turns_tcp_nodelay_on(run_in_loop: Runner) -> None:
    async def body() -> None:
        async with transport_pair() as (client, _):
            sock = socket_of(client)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
            set_nodelay(sock)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

    run_in_loop(body)


def test_options_on_a_closed_transport_socket_are_silently_ignored(run_in_loop: Runner) -> None:
    async def body() -> None:
        async with transport_pair() as (client, _):
            sock = socket_of(client)
            client.made.result().close()
            await client.lost.wait()
            assert sock.fileno() == -1
            apply_keepalive(sock, **KEEPALIVE)
            set_nodelay(sock)
            assert read_keepalive(sock) is None

    run_in_loop(body)


def test_unix_socket_is_left_untouched(run_in_loop: Runner) -> None:
    async def body() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            async with transport_pair(str(Path(tmp) / "s.sock")) as (client, _):
                sock = socket_of(client)
                assert not is_tcp(sock)
                apply_keepalive(sock, **KEEPALIVE)
                set_nodelay(sock)
                # Untouched: SO_KEEPALIVE stays off, TCP-level options are not applicable.
                assert read_keepalive(sock) == KeepaliveReadback(False, None, None, None, None)

    run_in_loop(body)


def test_plain_socket_takes_keepalive_and_a_closed_one_is_ignored() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        with client:
            apply_keepalive(client, **KEEPALIVE)
            readback = read_keepalive(client)
            assert readback is not None
            assert readback.idle_s == 60
    apply_keepalive(client, **KEEPALIVE)
    set_nodelay(client)
    assert read_keepalive(client) is None


def test_ipv6_loopback_is_tcp_and_takes_keepalive() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("::1 not configured")
    with listener, socket.create_connection(listener.getsockname()[:2]) as client:
        assert is_tcp(client)
        apply_keepalive(client, **KEEPALIVE)
        readback = read_keepalive(client)
        assert readback is not None
        assert readback.count == 4


def test_udp_is_not_tcp_and_keepalive_leaves_it_untouched() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert not is_tcp(udp)
        apply_keepalive(udp, **KEEPALIVE)
        assert read_keepalive(udp) == KeepaliveReadback(False, None, None, None, None)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_durations_raise_value_error(bad: float) -> None:
    with socket.socket() as sock, pytest.raises(ValueError, match="duration"):
        apply_keepalive(sock, **{**KEEPALIVE, "idle": bad})
