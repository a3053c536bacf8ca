"""End-to-end forwarding through the daemon subprocess: byte-exact, half-close, flow control."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.payload import PayloadUpstream, exchange
from tests.support import DaemonProcess, daemon_config, eventually, listener_config

MiB = 1024 * 1024

# The same suite runs on each data path and process layout (issue: speed). A variant sets
# top-level config keys, and under "listener" keys of every listener.
VARIANTS: dict[str, dict[str, Any]] = {
    "portable": {},
    "workers2": {"workers": 2},
    "splice": {"listener": {"data_path": "splice"}},
}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> dict[str, Any]:
    return VARIANTS[request.param]


def config_for(variant: dict[str, Any], *listeners: dict[str, Any]) -> dict[str, Any]:
    top = dict(variant)
    extra = top.pop("listener", {})
    return daemon_config(*({**listener, **extra} for listener in listeners), **top)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_200_concurrent_connections_are_byte_exact_and_counted(
    tmp_path: Path, variant: dict[str, Any]
) -> None:
    rng = random.Random(20261124)
    async with PayloadUpstream() as upstream:
        cfg = config_for(variant, listener_config("app", [upstream.address]))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            port = daemon.port("app")
            sizes = [(rng.randrange(0, 4 * MiB), rng.randrange(0, 4 * MiB)) for _ in range(200)]
            results = await asyncio.gather(
                *(exchange(port, i, s, r) for i, (s, r) in enumerate(sizes))
            )
            for res, (_, reply_len) in zip(results, sizes, strict=True):
                assert res.reply_ok, (
                    f"connection {res.nonce}: reply corrupted: {res}, sizes {sizes[res.nonce]}, "
                    f"upstream saw {upstream.received.get(res.nonce)}, errors {upstream.errors[:3]}"
                )
                assert res.reply_len == reply_len
                got = upstream.received[res.nonce]
                assert (got.nbytes, got.digest) == (res.sent, res.sent_digest)

            await daemon.wait_for("connection_closed", count=200, timeout=30)
            m = await daemon.metrics()
            sent = sum(r.sent for r in results)
            replied = sum(r for _, r in sizes)
            assert m['connwatch_bytes_total{direction="client_to_upstream",listener="app"}'] == sent
            assert (
                m['connwatch_bytes_total{direction="upstream_to_client",listener="app"}'] == replied
            )
            assert m['connwatch_connections_accepted_total{listener="app"}'] == 200
            assert (
                m['connwatch_connections_closed_total{listener="app",reason="client_closed"}']
                == 200
            )
            assert m['connwatch_connections_active{listener="app"}'] == 0
            assert m['connwatch_connection_duration_seconds_count{listener="app"}'] == 200
            closed = daemon.find("connection_closed")
            assert sum(line["bytes_client_to_upstream"] for line in closed) == sent
            assert sum(line["bytes_upstream_to_client"] for line in closed) == replied


async def test_half_close_lets_upstream_answer_after_client_eof(
    tmp_path: Path, variant: dict[str, Any]
) -> None:
    got_eof = asyncio.Event()
    reply = bytes(range(256)) * (4 * 1024)  # 1 MiB

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the client's EOF
        assert request == b"question"
        got_eof.set()
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    cfg = config_for(variant, listener_config("app", [address]))
    async with server, DaemonProcess(tmp_path, cfg) as daemon:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port("app"))
        writer.write(b"question")
        writer.write_eof()
        await asyncio.wait_for(got_eof.wait(), 5)
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert data == reply
        closed = await daemon.wait_for("connection_closed")
        assert closed["reason"] == "client_closed"
        assert closed["bytes_upstream_to_client"] == len(reply)


@pytest.mark.slow
async def test_slow_reader_bounds_memory_and_loses_nothing(
    tmp_path: Path, variant: dict[str, Any]
) -> None:
    total = 1024 * MiB
    chunk = bytes(range(256)) * 1024  # 256 KiB with a position-dependent pattern
    sent_all = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.close()
        sent_all.set()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    cfg = config_for(variant, listener_config("app", [address], buffer_size="256KiB"))
    async with server, DaemonProcess(tmp_path, cfg) as daemon:
        assert daemon.proc is not None
        baseline = _rss_kib(daemon.proc.pid)
        client = socket.create_connection(("127.0.0.1", daemon.port("app")))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        # The client reads nothing: the daemon must pause the upstream instead of buffering.
        await daemon.wait_for("connection_opened")
        m = await eventually(_flow_paused(daemon), timeout=10)
        assert m
        peak = _rss_kib(daemon.proc.pid)
        assert not sent_all.is_set()
        received = await asyncio.to_thread(_read_all, client, chunk)
        peak = max(peak, _rss_kib(daemon.proc.pid))
        assert received == total
        assert peak - baseline < 64 * 1024, f"RSS grew by {peak - baseline} KiB"


def _flow_paused(daemon: DaemonProcess):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        m = await daemon.metrics()
        return m['connwatch_flow_paused_total{direction="upstream_to_client",listener="app"}'] > 0

    return check


def _read_all(sock: socket.socket, pattern: bytes) -> int:
    """Read to EOF, checking every byte against the repeating pattern; returns the count."""
    n = 0
    view = memoryview(pattern * 2)
    plen = len(pattern)
    with sock:
        while True:
            data = sock.recv(1024 * 1024)
            if not data:
                return n
            start = n % plen
            assert data == view[start : start + len(data)] or _slow_match(data, pattern, start)
            n += len(data)


def _slow_match(data: bytes, pattern: bytes, start: int) -> bool:
    reps = (start + len(data)) // len(pattern) + 2
    return data == (pattern * reps)[start : start + len(data)]
