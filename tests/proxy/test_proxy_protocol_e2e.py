"""PROXY protocol end to end through the daemon subprocess (SPEC sections 3 and 8).

`send: v1|v2`: an upstream that parses the header (with connwatch.wire.proxy_protocol.parse) sees
the real client address and port. `accept: true`: the client's header is consumed, the payload
after it arrives intact, and the header's source is the connection's `client`. Malformed or
missing headers close with `protocol_error` within `connect_timeout`; the daemon serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from connwatch.exceptions import IncompleteError
from connwatch.wire import proxy_protocol
from connwatch.wire.proxy_protocol import ProxyHeader, ProxyProtocolError, encode_v1, encode_v2
from tests.support import (
    LOOPBACK,
    DaemonProcess,
    EchoUpstream,
    daemon_config,
    eventually,
    listener_config,
)
from tests.variant import WORKERS

CONNECT_TIMEOUT = 0.5
PROXY_ERRORS = 'connwatch_protocol_errors_total{kind="proxy_protocol"}'
# Documentation addresses: they only ever travel inside headers, never as traffic.
SOURCE4, DEST4 = ("203.0.113.7", 4242), ("198.51.100.1", 443)
SOURCE6, DEST6 = ("2001:db8::7", 4343), ("2001:db8::1", 443)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


class ProxyAwareUpstream:
    """Parses the PROXY header that starts each connection, records it, then echoes the rest."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self.host = host
        self.headers: list[ProxyHeader] = []
        self.errors: list[str] = []
        self.server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    async def __aenter__(self) -> ProxyAwareUpstream:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = b""
        try:
            while True:  # bounded: a header is at most 16 + 65535 bytes, else parse refuses it
                chunk = await reader.read(4096)
                if not chunk:
                    self.errors.append(f"closed after {received!r}")
                    return
                received += chunk
                try:
                    header, used = proxy_protocol.parse(received)
                    break
                except IncompleteError:
                    continue
            self.headers.append(header)
            writer.write(received[used:])
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except ProxyProtocolError as exc:
            self.errors.append(str(exc))
        except ConnectionError:
            pass
        finally:
            writer.close()


class AcceptGate:
    """Before a client speaks, wait until the daemon has counted its accept.

    Works around the race pinned by `test_header_in_the_first_segment_is_seen`: bytes the
    daemon reads before its header reader is in place are never examined. Once the accept is
    counted, the task that installs the reader is queued ahead of any later read."""

    def __init__(self, daemon: DaemonProcess, listener: str = "app") -> None:
        self.daemon = daemon
        self.key = f'connwatch_connections_accepted_total{{listener="{listener}"}}'
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1

        async def counted() -> bool:
            return (await self.daemon.metrics())[self.key] >= self.count

        await eventually(counted, timeout=10, interval=0.01)


async def talk(
    port: int,
    payload: bytes,
    *,
    host: str = LOOPBACK,
    preface: bytes = b"",
    gate: AcceptGate | None = None,
) -> tuple[tuple[str, int], bytes]:
    """Connect, send `preface` then `payload` in pieces, half-close, read the whole echo.

    Returns the client's own (host, port) and what came back."""
    reader, writer = await asyncio.open_connection(host, port)
    if gate is not None:
        await gate()
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    own = writer.get_extra_info("sockname")[:2]
    try:
        data = preface + payload
        for start in range(0, len(data), 7):  # small writes: a header may arrive split
            writer.write(data[start : start + 7])
            await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(10):
            echoed = await reader.read()
    finally:
        writer.close()
    return (own[0], own[1]), echoed


async def closed_by_peer(reader: asyncio.StreamReader) -> bytes:
    """Read to the end; a reset counts as the end."""
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


@contextlib.asynccontextmanager
async def daemon_with(tmp_path: Path, *listeners: dict[str, Any]) -> AsyncIterator[DaemonProcess]:
    async with DaemonProcess(tmp_path, daemon_config(*listeners)) as daemon:
        yield daemon


def proxy(accept: bool = False, send: str = "none") -> dict[str, Any]:
    return {"proxy_protocol": {"accept": accept, "send": send}, "connect_timeout": "500ms"}


# -- send: the upstream learns the client ------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_upstream_sees_the_true_client_address_and_port(version: str, tmp_path: Path) -> None:
    async with ProxyAwareUpstream() as upstream:
        app = listener_config("app", [upstream.address], **proxy(send=version))
        async with daemon_with(tmp_path, app) as daemon:
            port = daemon.port("app")
            payloads = [f"hello {i} ".encode() * 100 for i in range(3)]
            results = [await talk(port, p) for p in payloads]
            await daemon.wait_for("connection_closed", count=3)
    assert upstream.errors == []
    assert [echo for _, echo in results] == payloads  # the header is not echoed to the client
    want = [(own, (LOOPBACK, port)) for own, _ in results]
    got = [(h.source, h.destination) for h in upstream.headers]
    assert got == want
    assert len({own[1] for own, _ in results}) == 3  # three ephemeral ports, each passed on
    assert {(h.version, h.command, h.family) for h in upstream.headers} == {
        (int(version[1]), "PROXY", "TCP4")
    }
    closed = daemon.find("connection_closed")
    # The payload counts; the header connwatch added is not client bytes.
    assert [c["bytes_client_to_upstream"] for c in closed] == [len(p) for p in payloads]


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_upstream_sees_an_ipv6_client(version: str, tmp_path: Path) -> None:
    async with ProxyAwareUpstream("::1") as upstream:
        app = listener_config("app", [upstream.address], listen="[::1]:0", **proxy(send=version))
        async with daemon_with(tmp_path, app) as daemon:
            own, echoed = await talk(daemon.port("app"), b"over v6", host="::1")
    assert echoed == b"over v6"
    (header,) = upstream.headers
    assert (header.family, header.source, header.destination) == (
        "TCP6",
        own,
        ("::1", daemon.port("app")),
    )


# -- accept: the client's header is consumed ---------------------------------------------------


HEADERS = {
    "v1": encode_v1(SOURCE4, DEST4),
    "v2": encode_v2(SOURCE4, DEST4),
    "v1-tcp6": encode_v1(SOURCE6, DEST6),
    "v2-tcp6": encode_v2(SOURCE6, DEST6),
}
ADDRESSLESS = {"v1-unknown": encode_v1(None, None), "v2-local": encode_v2(None, None, local=True)}
SHOWN = {"v1": "203.0.113.7:4242", "v2": "203.0.113.7:4242"}
SHOWN.update({"v1-tcp6": "[2001:db8::7]:4343", "v2-tcp6": "[2001:db8::7]:4343"})


@pytest.mark.parametrize("kind", sorted([*HEADERS, *ADDRESSLESS]))
async def test_accepting_listener_forwards_the_payload_intact(kind: str, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 64 + b"PROXY TCP4 looks like a header but is payload\r\n"
    preface = HEADERS.get(kind) or ADDRESSLESS[kind]
    async with EchoUpstream() as echo:
        app = listener_config("app", [echo.address], **proxy(accept=True))
        async with daemon_with(tmp_path, app) as daemon:
            gate = AcceptGate(daemon)
            own, echoed = await talk(daemon.port("app"), payload, preface=preface, gate=gate)
            closed = await daemon.wait_for("connection_closed")
    assert echoed == payload
    assert echo.received == len(payload)  # not one byte of the header reached the upstream
    # A header without addresses leaves the real peer as the client.
    shown = SHOWN.get(kind, f"{own[0]}:{own[1]}")
    assert closed["client"] == shown
    assert closed["reason"] == "client_closed"
    assert daemon.find("connection_opened")[0]["client"] == shown


async def test_header_in_the_first_segment_is_seen(tmp_path: Path) -> None:
    """A client (or proxy) that sends header and payload at once, right after connecting."""
    async with EchoUpstream() as echo:
        app = listener_config("app", [echo.address], **proxy(accept=True))
        async with daemon_with(tmp_path, app) as daemon:
            echoed = []
            for i in range(20):  # the race is lost about half the time: 20 make it certain
                reader, writer = await asyncio.open_connection(LOOPBACK, daemon.port("app"))
                writer.write(HEADERS["v1"] + b"ping %d" % i)
                async with asyncio.timeout(CONNECT_TIMEOUT + 1):
                    echoed.append(await closed_by_peer_or(reader, len(b"ping %d" % i)))
                writer.close()
    assert echoed == [b"ping %d" % i for i in range(20)]


async def closed_by_peer_or(reader: asyncio.StreamReader, n: int) -> bytes:
    """`n` bytes, or what came before the peer closed."""
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    except ConnectionResetError:
        return b""


async def test_accepted_header_is_not_counted_as_forwarded_bytes(tmp_path: Path) -> None:
    async with EchoUpstream() as echo:
        app = listener_config("app", [echo.address], **proxy(accept=True))
        async with daemon_with(tmp_path, app) as daemon:
            gate = AcceptGate(daemon)
            await talk(daemon.port("app"), b"x" * 1000, preface=HEADERS["v2"], gate=gate)
            closed = await daemon.wait_for("connection_closed")
            metrics = await daemon.metrics()
    assert echo.received == 1000
    assert closed["bytes_client_to_upstream"] == 1000
    assert metrics['connwatch_bytes_total{direction="client_to_upstream",listener="app"}'] == 1000


async def test_accepted_client_shows_in_connections_while_open(tmp_path: Path) -> None:
    async with EchoUpstream() as echo:
        app = listener_config("app", [echo.address], **proxy(accept=True))
        async with daemon_with(tmp_path, app) as daemon:
            reader, writer = await asyncio.open_connection(LOOPBACK, daemon.port("app"))
            await AcceptGate(daemon)()
            writer.write(HEADERS["v1"] + b"ping")
            assert await reader.readexactly(4) == b"ping"
            (record,) = await daemon.connections()
            assert record["client"] == SHOWN["v1"]
            assert record["upstream"] == echo.address
            writer.close()
            await daemon.wait_for("connection_closed")


@pytest.mark.parametrize("send", ["v1", "v2"])
async def test_accept_and_send_pass_on_the_original_client(send: str, tmp_path: Path) -> None:
    async with ProxyAwareUpstream() as upstream:
        app = listener_config("app", [upstream.address], **proxy(accept=True, send=send))
        async with daemon_with(tmp_path, app) as daemon:
            port, gate = daemon.port("app"), AcceptGate(daemon)
            _, echo4 = await talk(port, b"four", preface=HEADERS["v1"], gate=gate)
            _, echo6 = await talk(port, b"six", preface=HEADERS["v2-tcp6"], gate=gate)
    assert (echo4, echo6) == (b"four", b"six")
    assert [(h.source, h.destination) for h in upstream.headers] == [
        (SOURCE4, DEST4),
        (SOURCE6, DEST6),
    ]


async def test_accept_and_send_use_the_real_peer_for_a_local_header(tmp_path: Path) -> None:
    async with ProxyAwareUpstream() as upstream:
        app = listener_config("app", [upstream.address], **proxy(accept=True, send="v2"))
        async with daemon_with(tmp_path, app) as daemon:
            local = encode_v2(None, None, local=True)
            gate = AcceptGate(daemon)
            own, echoed = await talk(daemon.port("app"), b"lb check", preface=local, gate=gate)
    assert echoed == b"lb check"
    (header,) = upstream.headers
    assert (header.source, header.destination) == (own, (LOOPBACK, daemon.port("app")))


# -- malformed and missing headers ------------------------------------------------------------


GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "v1-oversized": b"PROXY TCP4 " + b"1" * 120,  # no CRLF within 107 bytes
    "v1-bad-address": b"PROXY TCP4 300.1.1.1 10.0.0.1 1 2\r\n",
    "v2-short-length": proxy_protocol.V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 4) + bytes(4),
    "v2-bad-version": proxy_protocol.V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),
}


async def test_bad_headers_close_with_protocol_error_and_the_daemon_serves_on(
    tmp_path: Path,
) -> None:
    async with EchoUpstream() as echo:
        app = listener_config("app", [echo.address], **proxy(accept=True))
        async with daemon_with(tmp_path, app) as daemon:
            port, gate = daemon.port("app"), AcceptGate(daemon)
            for name, garbage in GARBAGE.items():
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
                await gate()
                started = time.monotonic()
                writer.write(garbage)
                async with asyncio.timeout(CONNECT_TIMEOUT + 1):
                    assert await closed_by_peer(reader) == b"", name
                # Refused at once, not after waiting out connect_timeout.
                assert time.monotonic() - started < CONNECT_TIMEOUT, name
                writer.close()

            # A client that sends nothing is closed when connect_timeout ends.
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            await gate()
            started = time.monotonic()
            async with asyncio.timeout(CONNECT_TIMEOUT + 1):
                assert await closed_by_peer(reader) == b""
            waited = time.monotonic() - started
            writer.close()
            assert CONNECT_TIMEOUT * 0.9 <= waited < CONNECT_TIMEOUT + 1

            n = len(GARBAGE) + 1
            closed = [await daemon.wait_for("connection_closed", count=i) for i in range(1, n + 1)]
            errors = daemon.find("protocol_error", kind="proxy_protocol")
            metrics = await daemon.metrics()
            # ...and then serves a good client.
            _, echoed = await talk(port, b"after the garbage", preface=HEADERS["v2"], gate=gate)
            assert echoed == b"after the garbage"
            assert await daemon.get("/healthz") == (200, b'{"status":"UP"}')
    assert [c["reason"] for c in closed] == ["protocol_error"] * n
    assert metrics[PROXY_ERRORS] == n
    assert (
        metrics['connwatch_connections_closed_total{listener="app",reason="protocol_error"}'] == n
    )
    # Warnings are throttled (one line per 10 s per listener and process, the rest counted as
    # suppressed); the metric above counts every one.
    assert 1 <= len(errors) <= WORKERS, errors
    assert errors[0]["suppressed"] == 0
    assert echo.accepted == 1  # no garbage connection ever reached the upstream


async def test_a_client_that_leaves_mid_header_is_not_a_protocol_error(tmp_path: Path) -> None:
    async with EchoUpstream() as echo:
        app = listener_config("app", [echo.address], **proxy(accept=True))
        async with daemon_with(tmp_path, app) as daemon:
            port = daemon.port("app")
            sock = socket.create_connection((LOOPBACK, port))
            sock.sendall(b"PROXY TCP4 ")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # reset
            closed = await daemon.wait_for("connection_closed")
            # A silent client's timeout ends after the reset one's would have: by its
            # protocol_error line, a late one for the reset client would be there too.
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            async with asyncio.timeout(CONNECT_TIMEOUT + 1):
                await closed_by_peer(reader)
            writer.close()
            await daemon.wait_for("connection_closed", count=2)
            metrics = await daemon.metrics()
    assert closed["reason"] == "client_reset"
    assert len(daemon.find("protocol_error")) == 1  # the silent client's only
    assert metrics[PROXY_ERRORS] == 1
