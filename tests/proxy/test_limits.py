"""Connect failures and per-connection limits, end to end through the daemon subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

from tests.support import (
    DaemonProcess,
    EchoUpstream,
    daemon_config,
    free_port,
    listener_config,
)
from tests.variant import skip_under

_LIMIT_PER_WORKER = skip_under(
    "workers2",
    "max_connections holds per worker process, as client limits do (docs/spec-notes.md), so two "
    "workers admit up to twice it",
)


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _served(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` clients, each seen served (a byte echoed), kept open."""
    kept = [await _open(port) for _ in range(count)]
    for r, w in kept:
        w.write(b"k")
        assert await asyncio.wait_for(r.readexactly(1), 2) == b"k"
    return kept


async def _roundtrip(port: int, payload: bytes = b"ping") -> bytes:
    reader, writer = await _open(port)
    writer.write(payload)
    data = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
    writer.close()
    return data


async def test_refused_upstream_closes_client_within_connect_timeout(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    cfg = daemon_config(listener_config("app", [dead], connect_timeout="1s"))
    async with DaemonProcess(tmp_path, cfg) as daemon:
        started = time.monotonic()
        reader, writer = await _open(daemon.port("app"))
        writer.write(b"hello")
        # EOF, or a reset when "hello" was still unread in the kernel at close (a race the load
        # on the machine decides): either way the client is closed, and in time.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 2 + 1) == b""
        assert time.monotonic() - started < 1 + 1
        closed = await daemon.wait_for("connection_closed")
        assert closed["reason"] == "upstream_connect_failed"
        m = await daemon.metrics()
        assert (
            m[f'connwatch_upstream_connect_failures_total{{listener="app",upstream="{dead}"}}'] == 2
        )
        writer.close()


async def test_connect_attempts_reach_the_live_target(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with EchoUpstream() as live:
        cfg = daemon_config(
            listener_config("app", [dead, live.address], balance="first", connect_attempts=2)
        )
        async with DaemonProcess(tmp_path, cfg) as daemon:
            assert await _roundtrip(daemon.port("app")) == b"ping"
            opened = await daemon.wait_for("connection_opened")
            assert opened["upstream"] == live.address


async def test_idle_timeout_closes_only_the_idle_connection(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address], idle_timeout="600ms"))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            port = daemon.port("app")
            idle_r, idle_w = await _open(port)
            busy_r, busy_w = await _open(port)
            started = time.monotonic()
            # Keep one connection busy past the other's idle deadline.
            while time.monotonic() - started < 1.5:
                busy_w.write(b"x")
                assert await asyncio.wait_for(busy_r.readexactly(1), 2) == b"x"
                await asyncio.sleep(0.1)
            assert await asyncio.wait_for(idle_r.read(), 2) == b""
            closed = await daemon.wait_for("connection_closed")
            assert closed["reason"] == "idle_timeout"
            assert 0.6 <= closed["duration_s"] < 1.5
            busy_w.write(b"y")
            assert await asyncio.wait_for(busy_r.readexactly(1), 2) == b"y"
            for w in (idle_w, busy_w):
                w.close()


async def test_half_close_timeout_closes_the_stalled_connection_and_spares_others(
    tmp_path: Path,
) -> None:
    release = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads to EOF and then neither answers nor closes
        await release.wait()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with EchoUpstream() as echo:
        cfg = daemon_config(
            listener_config("app", [address], half_close_timeout="500ms"),
            listener_config("other", [echo.address]),
        )
        async with server, DaemonProcess(tmp_path, cfg) as daemon:
            reader, writer = await _open(daemon.port("app"))
            other_r, other_w = await _open(daemon.port("other"))
            writer.write(b"done")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 3) == b""
            closed = await daemon.wait_for("connection_closed", listener="app")
            assert closed["reason"] == "half_close_timeout"
            other_w.write(b"z")
            assert await asyncio.wait_for(other_r.readexactly(1), 2) == b"z"
            writer.close()
            other_w.close()
            release.set()


async def test_max_lifetime_closes_at_a_quiet_gap(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address], max_lifetime="1s"))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            reader, writer = await _open(daemon.port("app"))
            writer.write(b"a")
            assert await reader.readexactly(1) == b"a"
            assert await asyncio.wait_for(reader.read(), 4) == b""
            closed = await daemon.wait_for("connection_closed")
            assert closed["reason"] == "max_lifetime"
            assert 0.9 <= closed["duration_s"] <= 2.5
            writer.close()


@_LIMIT_PER_WORKER
async def test_max_connections_refuses_extra_clients_and_counts_them(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address], max_connections=2))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            port = daemon.port("app")
            kept = await _served(port, 2)
            reader, writer = await _open(port)
            assert await asyncio.wait_for(reader.read(), 3) == b""
            closed = await daemon.wait_for("connection_closed")
            assert closed["reason"] == "max_connections"
            m = await daemon.metrics()
            assert m['connwatch_connections_accepted_total{listener="app"}'] == 3
            assert (
                m['connwatch_connections_closed_total{listener="app",reason="max_connections"}']
                == 1
            )
            assert m['connwatch_connections_active{listener="app"}'] == 2
            for r, w in kept:  # the admitted ones still work
                w.write(b"m")
                assert await asyncio.wait_for(r.readexactly(1), 2) == b"m"
                w.close()
            writer.close()


async def _echoed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether this client is served (its byte comes back) or was refused (EOF or reset)."""
    writer.write(b"x")
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b"x"
    except ConnectionResetError:
        return False
    finally:
        writer.close()


@_LIMIT_PER_WORKER
async def test_max_connections_refuses_only_the_excess_of_one_accept_burst(tmp_path: Path) -> None:
    """Clients accepted together (one accept batch: the daemon is held while they connect) are
    all counted before any is admitted; only those beyond the limit are refused, not all of
    them."""
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address], max_connections=4))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            port = daemon.port("app")
            kept = await _served(port, 2)
            daemon.signal(signal.SIGSTOP)  # the kernel completes the handshakes: one backlog
            try:
                burst = [await _open(port) for _ in range(5)]
            finally:
                daemon.signal(signal.SIGCONT)
            served = await asyncio.gather(*(_echoed(r, w) for r, w in burst))
            assert sorted(served) == [False, False, False, True, True], served
            m = await daemon.metrics()
            assert (
                m['connwatch_connections_closed_total{listener="app",reason="max_connections"}']
                == 3
            )
            for _, w in kept:
                w.close()
