"""TCP_INFO on live loopback connections (Linux): states, byte counters, windows, edge cases."""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields

import pytest
import uvloop

from connwatch._types import SocketLike
from connwatch.liveness.tcp_info import (
    CORE_FIELDS,
    CORE_SIZE,
    PLAIN_FIELDS,
    TCP_ESTABLISHED,
    TCP_INFO_SIZE,
    TCP_STATES,
    TcpInfo,
    parse_core,
    parse_tcp_info,
    plain_of_short,
    read_tcp_core,
    read_tcp_info,
    unpack_plain,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO is Linux")

TCP_CLOSE_WAIT = 8
TCP_LISTEN = 10
DEADLINE_S = 5.0


@contextmanager
def tcp_pair(client_rcvbuf: int | None = None) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected (client, server) pair of blocking sockets on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        if client_rcvbuf is not None:  # before connect: it decides the advertised scale
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_rcvbuf)
        client.settimeout(DEADLINE_S)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        server.settimeout(DEADLINE_S)
        with client, server:
            yield client, server


def info_of(sock: SocketLike) -> TcpInfo:
    info = read_tcp_info(sock)
    assert info is not None
    return info


def wait_for_info(sock: SocketLike, cond: Callable[[TcpInfo], bool], what: str) -> TcpInfo:
    """Poll TCP_INFO until `cond` holds. The kernel offers no event for "an ACK arrived" or
    "the window closed", so this is a bounded poll of short waits with a deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        info = info_of(sock)
        if cond(info):
            return info
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last TCP_INFO: {info}")
        time.sleep(0.005)


def recv_exactly(sock: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        assert chunk, "peer closed early"
        got += len(chunk)


def test_established_pair() -> None:
    with tcp_pair() as (client, server):
        for sock in (client, server):
            info = info_of(sock)
            assert info.state == TCP_ESTABLISHED
            assert info.state_name == "ESTABLISHED"
            assert info.rtt_s == info.rtt_us / 1_000_000
            assert info.snd_mss > 0
            assert info.rcv_wnd is not None
            assert info.rcv_wnd > 0  # kernel 6.2+ reports it; this machine runs 6.18


def test_listen_and_close_wait_states() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        assert info_of(listener).state_name == "LISTEN"
    with tcp_pair() as (client, server):
        client.shutdown(socket.SHUT_WR)
        assert server.recv(1) == b""  # the FIN has arrived
        assert info_of(server).state == TCP_CLOSE_WAIT
    assert TCP_STATES[TCP_LISTEN] == "LISTEN"


def test_bytes_acked_and_received_match_what_the_peer_read() -> None:
    n = 3 * 1024 * 1024 + 17
    with tcp_pair() as (client, server):
        # The connecting side's bytes_acked starts at 1: its SYN was acknowledged.
        before = info_of(client).bytes_acked
        assert before == 1
        client.sendall(b"a" * n)
        recv_exactly(server, n)
        # Everything is read; the last ACK may still be delayed (delayed-ACK timer).
        wait_for_info(client, lambda i: i.bytes_acked == before + n, "bytes_acked == sent")
        received = info_of(server)
        assert received.bytes_received == n
        assert received.data_segs_in is not None
        assert received.data_segs_in > 0
        sent = info_of(client)
        assert sent.bytes_sent == n  # loopback: no retransmissions
        assert sent.unacked == 0
        assert sent.notsent_bytes == 0


def test_zero_window_shows_as_snd_wnd_zero_with_data_held_back() -> None:
    """A reader that stops reading: how the writer's TCP_INFO shows it (kernel 6.18).

    - writer: snd_wnd == 0 (the peer's advertised window), unacked == 0 (nothing in flight:
      zero-window probes carry no new data), notsent_bytes > 0 (queued behind the window),
      backoff grows with each unanswered-window probe interval; `probes` counts probes since
      the last ACK and drops back to 0 when a probe is answered, so it flickers on loopback.
    - reader: rcv_wnd == 0 (our advertised window).
    So "alive but not reading" is snd_wnd == 0 with bytes held, not unacked > 0.
    """
    with tcp_pair() as (writer, reader):
        writer.setblocking(False)
        sent, deadline = 0, time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:  # fill both buffers, bounded in time
            try:
                sent += writer.send(b"z" * 65536)
            except BlockingIOError:
                break
        else:
            pytest.fail("send buffer never filled")

        held = wait_for_info(
            writer,
            lambda i: i.snd_wnd == 0 and i.unacked == 0 and i.backoff >= 1,
            "zero window with probes backing off",
        )
        assert held.notsent_bytes is not None
        assert held.notsent_bytes > 0
        assert held.state == TCP_ESTABLISHED
        assert info_of(reader).rcv_wnd == 0

        reader.settimeout(DEADLINE_S)
        recv_exactly(reader, sent)
        resumed = wait_for_info(
            writer, lambda i: i.unacked == 0 and i.notsent_bytes == 0, "all data acknowledged"
        )
        assert resumed.snd_wnd is not None
        assert resumed.snd_wnd > 0
        assert resumed.backoff == 0


def test_window_scale_nibbles_are_in_the_right_order() -> None:
    # A small receive buffer set before connect makes the client advertise a smaller scale.
    with tcp_pair(client_rcvbuf=8192) as (client, server):
        mine, theirs = info_of(client), info_of(server)
    assert mine.rcv_wscale < theirs.rcv_wscale
    assert mine.snd_wscale == theirs.rcv_wscale
    assert theirs.snd_wscale == mine.rcv_wscale
    assert mine.options & 4  # TCPI_OPT_WSCALE


def test_second_bitfield_byte() -> None:
    with tcp_pair() as (client, _):
        raw = bytearray(client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE))
    first_bit, shift = (1, 1) if sys.byteorder == "little" else (0x80, 5)
    raw[7] = first_bit | (2 << shift)  # app_limited = 1, fastopen_client_fail = 2
    info = parse_tcp_info(bytes(raw))
    assert info is not None
    assert info.delivery_rate_app_limited is True
    assert info.fastopen_client_fail == 2


def test_short_struct_from_older_kernels() -> None:
    with tcp_pair() as (client, server):
        client.sendall(b"x" * 1000)
        recv_exactly(server, 1000)
        raw = server.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    full = parse_tcp_info(raw)
    assert full is not None
    assert len(raw) == TCP_INFO_SIZE
    assert parse_tcp_info(raw[:103]) is None
    base = parse_tcp_info(raw[:104])  # struct as it was before pacing_rate
    assert base is not None
    assert base.total_retrans == full.total_retrans
    assert base.pacing_rate is None
    assert base.rcv_wnd is None
    cut = parse_tcp_info(raw[:136] + b"\xff" * 3)  # a partial field counts as missing
    assert cut is not None
    assert cut.bytes_received == 1000
    assert cut.segs_out is None
    older = parse_tcp_info(raw[:232])  # struct as it was before rcv_wnd
    assert older is not None
    assert older.snd_wnd == full.snd_wnd
    assert older.rcv_wnd is None


def test_core_tuple_matches_the_record() -> None:
    with tcp_pair() as (client, server):
        client.sendall(b"y" * 5000)
        recv_exactly(server, 5000)
        wait_for_info(client, lambda i: i.bytes_acked == 5001, "ACK")
        core = read_tcp_core(client)
        info = info_of(client)
    assert core is not None
    assert len(core) == len(CORE_FIELDS)
    for name, value in zip(CORE_FIELDS, core, strict=True):
        if name.endswith("_ms"):  # "ms ago": the clock ticks between the two reads
            assert 0 <= getattr(info, name) - value <= 1_000, name
        else:
            assert value == getattr(info, name), name
    assert set(CORE_FIELDS) <= {f.name for f in fields(TcpInfo)}


def test_plain_fields_match_the_record() -> None:
    with tcp_pair() as (client, server):
        client.sendall(b"z" * 3000)
        recv_exactly(server, 3000)
        wait_for_info(client, lambda i: i.bytes_acked == 3001, "ACK")
        raw = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, CORE_SIZE)
    info = parse_tcp_info(raw)
    assert info is not None
    plain = unpack_plain(raw)
    assert plain == tuple(getattr(info, name) for name in PLAIN_FIELDS)
    assert plain[PLAIN_FIELDS.index("bytes_acked")] == 3001
    assert parse_core(raw) == tuple(getattr(info, name) for name in CORE_FIELDS)
    assert set(PLAIN_FIELDS) <= set(CORE_FIELDS)


def test_core_and_plain_fields_from_older_kernels() -> None:
    """A kernel whose struct ends before a field gives -1 there; the fast unpack refuses it."""
    with tcp_pair() as (client, server):
        client.sendall(b"w" * 100)
        recv_exactly(server, 100)
        raw = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, CORE_SIZE)
    full = parse_core(raw)
    assert full is not None
    assert len(raw) == CORE_SIZE
    for cut in (104, 136, 228):
        with pytest.raises(struct.error):
            unpack_plain(raw[:cut])
    base = parse_core(raw[:104])  # before pacing_rate: no bytes_acked, notsent_bytes, snd_wnd
    assert base is not None
    missing = {"bytes_acked", "notsent_bytes", "snd_wnd"}
    for name, value, whole in zip(CORE_FIELDS, base, full, strict=True):
        assert value == (-1 if name in missing else whole), name
    assert plain_of_short(raw[:228]) == tuple(  # before snd_wnd (Linux < 5.4)
        -1 if name == "snd_wnd" else full[CORE_FIELDS.index(name)] for name in PLAIN_FIELDS
    )
    assert parse_core(raw[:103]) is None
    assert plain_of_short(raw[:103]) is None


def test_closed_socket_gives_none() -> None:
    with tcp_pair() as (client, _):
        pass
    assert read_tcp_info(client) is None
    assert read_tcp_core(client) is None


def test_non_tcp_sockets_give_none() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for sock in (left, udp):
            assert read_tcp_info(sock) is None
            assert read_tcp_core(sock) is None


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_transport_sockets_of_both_loops(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Open: ESTABLISHED through TransportSocket / uvloop's PseudoSocket; closed: None (uvloop's
    raises ValueError for its fd of -1, asyncio's OSError)."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
            sock: SocketLike = transport.get_extra_info("socket")
            assert info_of(sock).state == TCP_ESTABLISHED
            core = read_tcp_core(sock)
            assert core is not None
            assert core[0] == TCP_ESTABLISHED
            transport.close()
            await _until(lambda: sock.fileno() == -1)
            assert read_tcp_info(sock) is None
            assert read_tcp_core(sock) is None
        finally:
            server.close()
            await server.wait_closed()

    _run(loop_factory, body)


async def _until(cond: Callable[[], bool]) -> None:
    """Yield to the loop until `cond` holds (it flips within a few iterations); bounded."""
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0)
    pytest.fail("condition never held")


def _run(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], body: Callable[[], Awaitable[None]]
) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(body(), DEADLINE_S)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(bounded())
