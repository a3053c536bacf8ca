"""The public heartbeat module: PongResponder/start_responder and exchange(), on real
loopback sockets, plus the responder's logic driven through a recording transport."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import connwatch.heartbeat as hb
import connwatch.wire.heartbeat_frame
from connwatch.heartbeat import (
    Frame,
    FrameError,
    FrameType,
    PongResponder,
    decode,
    encode,
    exchange,
    ping,
    pong_for,
    start_responder,
)

Errors = asyncio.Queue[tuple[FrameError, str]]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _corrupt(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 0x01])


def _port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


@pytest.fixture
async def errors() -> Errors:
    return asyncio.Queue()


@pytest.fixture
async def responder(errors: Errors) -> AsyncIterator[int]:
    server = await start_responder(
        "127.0.0.1", 0, on_protocol_error=lambda e, p: errors.put_nowait((e, p))
    )
    async with server:
        yield _port(server)


async def _serve(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, _port(server)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


# --- the public module ----------------------------------------------------------------------


def test_module_reexports_the_codec() -> None:
    names = ["encode", "decode", "ping", "pong_for", "FrameDecoder", "Frame", "FrameType"]
    for name in [*names, "FrameError"]:
        assert name in hb.__all__
        assert getattr(hb, name) is getattr(connwatch.wire.heartbeat_frame, name)
    for name in hb.__all__:
        assert hasattr(hb, name)


# --- responder on loopback ------------------------------------------------------------------


async def test_responder_answers_pings_in_odd_chunkings(responder: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", responder)
    first, second, third = ping(1), ping(2), ping(2**64 - 1)
    # One PING and a partial one: the partial must wait in the buffer for its rest.
    writer.write(first + second[:5])
    assert decode(await reader.readexactly(16)) == Frame(FrameType.PONG, 1)
    for i in range(5, 16):  # the rest a byte at a time, then a frame split 15/1
        writer.write(second[i : i + 1])
        await writer.drain()
    writer.write(third[:15])
    await writer.drain()
    writer.write(third[15:])
    assert decode(await reader.readexactly(16)) == Frame(FrameType.PONG, 2)
    assert decode(await reader.readexactly(16)) == Frame(FrameType.PONG, 2**64 - 1)
    await _close(writer)


async def test_bad_checksum_closes_only_that_connection(responder: int, errors: Errors) -> None:
    good_reader, good_writer = await asyncio.open_connection("127.0.0.1", responder)
    bad_reader, bad_writer = await asyncio.open_connection("127.0.0.1", responder)
    bad_writer.write(_corrupt(ping(7)))
    error, peer = await errors.get()
    assert error.check == "checksum"
    host, port = bad_writer.get_extra_info("sockname")[:2]
    assert peer == f"{host}:{port}"
    assert await bad_reader.read() == b""  # closed by the responder, no PONG
    good_writer.write(ping(8))
    assert decode(await good_reader.readexactly(16)) == Frame(FrameType.PONG, 8)
    assert await exchange("127.0.0.1", responder, timeout=5.0) > 0  # a new one is served too
    assert errors.empty()
    await _close(good_writer)
    await _close(bad_writer)


@pytest.mark.parametrize(
    ("payload", "check"),
    [(pong_for(Frame(FrameType.PING, 3)), "type"), (b"HELLO", "magic"), (ping(4)[:9], "length")],
)
async def test_responder_reports_each_protocol_error(
    responder: int, errors: Errors, payload: bytes, check: str
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", responder)
    writer.write(payload)
    writer.write_eof()  # a frame cut short by the end of the stream is an error too
    error, _ = await errors.get()
    assert error.check == check
    assert await reader.read() == b""
    await _close(writer)


async def test_half_closing_client_still_gets_its_pong(responder: int, errors: Errors) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", responder)
    writer.write(ping(11))
    writer.write_eof()
    assert decode(await reader.read()) == Frame(FrameType.PONG, 11)
    await _close(writer)
    assert errors.empty()


async def test_failing_callback_goes_to_the_loop_exception_handler() -> None:
    loop = asyncio.get_running_loop()
    seen: asyncio.Future[dict[str, Any]] = loop.create_future()
    loop.set_exception_handler(lambda _loop, context: seen.set_result(context))

    def broken(error: FrameError, peer: str) -> None:
        raise RuntimeError("callback bug")

    try:
        async with await start_responder("127.0.0.1", 0, on_protocol_error=broken) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
            writer.write(b"junk")
            context = await seen
            assert isinstance(context["exception"], RuntimeError)
            assert await reader.read() == b""  # closed all the same
            await _close(writer)
    finally:
        loop.set_exception_handler(None)


async def test_responder_without_callback_just_closes() -> None:
    async with await start_responder("127.0.0.1", 0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
        writer.write(b"junk")
        assert await reader.read() == b""
        await _close(writer)


# --- responder logic with a recording transport ---------------------------------------------


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.1", 4242) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


@given(
    st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=6),
    st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
def test_responder_answers_every_ping_under_any_chunking(
    stamps: list[int], cuts: list[int]
) -> None:
    stream = b"".join(ping(s) for s in stamps)
    edges = [0, *sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]
    reported: list[tuple[FrameError, str]] = []
    protocol, transport = PongResponder(lambda e, p: reported.append((e, p))), RecordingTransport()
    protocol.connection_made(transport)
    for start, end in itertools.pairwise(edges):
        protocol.data_received(stream[start:end])
    expected = b"".join(encode(Frame(FrameType.PONG, s)) for s in stamps)
    assert bytes(transport.written) == expected
    assert protocol.pings_answered == len(stamps)
    assert not reported
    assert not transport.closed


@pytest.mark.parametrize(
    ("bad", "check"),
    [(_corrupt(ping(1)), "checksum"), (pong_for(Frame(FrameType.PING, 1)), "type")],
)
def test_responder_reports_once_and_ignores_bytes_after_failure(bad: bytes, check: str) -> None:
    reported: list[tuple[FrameError, str]] = []
    protocol, transport = PongResponder(lambda e, p: reported.append((e, p))), RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(bad)
    protocol.data_received(ping(2) + bad + b"x")
    protocol.eof_received()
    assert [(e.check, p) for e, p in reported] == [(check, "192.0.2.1:4242")]
    assert transport.closed
    assert transport.written == b""


def test_responder_pauses_reading_while_the_peer_does_not_read() -> None:
    protocol, transport = PongResponder(), RecordingTransport()
    protocol.connection_made(transport)
    protocol.pause_writing()
    assert not transport.reading
    protocol.resume_writing()
    assert transport.reading


# --- exchange -------------------------------------------------------------------------------


async def test_exchange_returns_small_positive_rtt(responder: int, errors: Errors) -> None:
    rtt = await exchange("127.0.0.1", responder, timeout=5.0)
    assert 0 < rtt < 5.0
    assert errors.empty()


async def test_exchange_over_ipv6_measures_a_positive_rtt() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = await start_responder("::1", 0)
    except OSError:
        pytest.skip("::1 not available")
    async with server:
        assert await exchange("::1", _port(server), timeout=5.0) > 0


def _reply_with(transform: Callable[[bytes], bytes]) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readexactly(16)
        writer.write(transform(request))
        await writer.drain()
        await reader.read()  # until the client closes
        await _close(writer)

    return handler


@pytest.mark.parametrize(
    ("transform", "check"),
    [
        (lambda req: _corrupt(pong_for(decode(req))), "checksum"),
        (lambda req: req, "type"),  # echoes the PING back
        (lambda req: pong_for(Frame(FrameType.PING, decode(req).timestamp_ms + 1)), "timestamp"),
        (lambda req: pong_for(decode(req))[:7], "length"),
        (lambda req: b"HTTP/1.1 400 Bad Request\r\n", "magic"),
    ],
)
async def test_exchange_rejects_bad_replies(
    transform: Callable[[bytes], bytes], check: str
) -> None:
    if check == "length":  # a partial frame, then the server closes
        inner = transform

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(inner(await reader.readexactly(16)))
            await _close(writer)

        server, port = await _serve(handler)
    else:
        server, port = await _serve(_reply_with(transform))
    async with server:
        with pytest.raises(FrameError) as info:
            await exchange("127.0.0.1", port, timeout=5.0)
        assert info.value.check == check


async def test_exchange_times_out_against_a_silent_server() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; returns once the client has closed
        await _close(writer)

    server, port = await _serve(silent)
    async with server:
        started = time.perf_counter()
        with pytest.raises(TimeoutError):
            await exchange("127.0.0.1", port, timeout=0.2)
        assert time.perf_counter() - started < 0.2 + 1.0


async def test_exchange_peer_closing_without_reply_is_oserror() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(16)  # read the PING first, so the close is a FIN, not a RST
        await _close(writer)

    server, port = await _serve(hang_up)
    async with server:
        with pytest.raises(OSError, match="without replying"):
            await exchange("127.0.0.1", port, timeout=5.0)


async def test_exchange_connect_failure_is_oserror() -> None:
    # A bound socket that is not listening refuses connections, and keeping it bound means
    # no other process can take the port meanwhile.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(ConnectionRefusedError):
            await exchange("127.0.0.1", sock.getsockname()[1], timeout=5.0)


# --- under uvloop ---------------------------------------------------------------------------


def test_responder_and_exchange_work_under_uvloop() -> None:
    """uvloop transports are not asyncio.Transport subclasses; the daemon may run on either."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> tuple[float, list[str]]:
        errors: Errors = asyncio.Queue()
        server = await start_responder(
            "127.0.0.1", 0, on_protocol_error=lambda e, p: errors.put_nowait((e, p))
        )
        async with server:
            rtt = await exchange("127.0.0.1", _port(server), timeout=5.0)
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
            writer.write(_corrupt(ping(1)))
            error, _ = await errors.get()
            assert await reader.read() == b""
            await _close(writer)
        return rtt, [error.check]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        rtt, checks = runner.run(scenario())
    assert rtt > 0
    assert checks == ["checksum"]
