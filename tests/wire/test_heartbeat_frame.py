"""The heartbeat frame codec (SPEC section 7): fixed vectors plus property-based tests."""

from __future__ import annotations

import contextlib
import itertools
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connwatch.exceptions import ProtocolError
from connwatch.wire import heartbeat_frame as frames
from connwatch.wire.heartbeat_frame import (
    FRAME_SIZE,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    decode,
    encode,
    ping,
    pong_for,
)

timestamps = st.integers(min_value=0, max_value=2**64 - 1)
valid_frames = st.builds(Frame, st.sampled_from(FrameType), timestamps)


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


def _cuts(stream: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted({p % (len(stream) + 1) for p in points}), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


def test_ping_encodes_to_the_known_byte_vector() -> None:
    data = encode(Frame(FrameType.PING, 0x0102030405060708))
    head = bytes.fromhex("CAFEBABE11") + bytes(range(1, 9))
    assert data[:13] == head
    assert data[13:] == (zlib.crc32(head) & 0xFFFFFF).to_bytes(3, "big")
    assert len(data) == FRAME_SIZE


def test_pong_echoes_ping_timestamp() -> None:
    stamped = decode(ping(1234))
    assert stamped == Frame(FrameType.PING, 1234)
    assert decode(pong_for(stamped)) == Frame(FrameType.PONG, 1234)
    with pytest.raises(ValueError, match="only a PING"):
        pong_for(Frame(FrameType.PONG, 1))


def test_ping_defaults_to_now() -> None:
    before = frames.now_ms()
    stamp = decode(ping()).timestamp_ms
    assert before <= stamp <= frames.now_ms()


def test_frame_rejects_unencodable_values() -> None:
    with pytest.raises(ValueError, match="timestamp"):
        Frame(FrameType.PING, 2**64)
    with pytest.raises(ValueError, match="timestamp"):
        Frame(FrameType.PING, -1)
    with pytest.raises(ValueError, match="FrameType"):
        Frame(1, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "check"),
    [
        (b"\x00" * 15, "length"),
        (b"\x00" * 17, "length"),
        (bytes.fromhex("CAFEBABF11") + bytes(11), "magic"),
        (bytes.fromhex("CAFEBABE21") + bytes(11), "version"),
        (bytes.fromhex("CAFEBABE13") + bytes(11), "type"),
        (bytes.fromhex("CAFEBABE10") + bytes(11), "type"),
        (encode(Frame(FrameType.PING, 7))[:13] + b"\x00\x00\x00", "checksum"),
    ],
)
def test_each_failed_check_is_named_in_the_frame_error(data: bytes, check: str) -> None:
    with pytest.raises(FrameError, match=check) as info:
        decode(data)
    assert info.value.check == check
    assert isinstance(info.value, ProtocolError)


@given(valid_frames)
def test_decode_of_encode_is_the_identity(frame: Frame) -> None:
    data = encode(frame)
    assert len(data) == FRAME_SIZE
    assert decode(data) == frame
    assert decode(bytearray(data)) == frame
    assert decode(memoryview(data)) == frame


@given(st.binary(max_size=40))
def test_random_bytes_raise_only_frame_error(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        decode(data)
    with contextlib.suppress(FrameError):
        FrameDecoder().feed(data)


@given(valid_frames, st.integers(min_value=0, max_value=FRAME_SIZE * 8 - 1))
def test_single_bit_flip_is_detected(frame: Frame, bit: int) -> None:
    with pytest.raises(FrameError) as info:
        decode(_flip(encode(frame), bit))
    assert info.value.check in {"magic", "version", "type", "checksum"}


def test_every_single_bit_flip_is_detected() -> None:
    """Exhaustive, so no timestamp bit could hide in the 24-bit truncation of the CRC."""
    data = encode(Frame(FrameType.PONG, 0xDEADBEEF))
    for bit in range(FRAME_SIZE * 8):
        with pytest.raises(FrameError):
            decode(_flip(data, bit))


@given(st.lists(valid_frames, max_size=8), st.lists(st.integers(min_value=0), max_size=20))
def test_decoder_yields_the_same_frames_under_any_chunking(
    sent: list[Frame], points: list[int]
) -> None:
    stream = b"".join(encode(f) for f in sent)
    decoder = FrameDecoder()
    got: list[Frame] = []
    for chunk in _cuts(stream, points):
        got += decoder.feed(chunk)
    assert got == sent
    assert decoder.pending == 0


def test_decoder_pending_counts_the_partial_frame() -> None:
    decoder = FrameDecoder()
    data = ping(5)
    assert decoder.feed(data[:10]) == []
    assert decoder.pending == 10
    assert decoder.feed(data[10:] + data[:3]) == [Frame(FrameType.PING, 5)]
    assert decoder.pending == 3


def test_decoder_stays_failed_after_a_bad_frame() -> None:
    decoder = FrameDecoder()
    bad = bytearray(ping(9))
    bad[-1] ^= 1
    with pytest.raises(FrameError, match="checksum"):
        decoder.feed(ping(8) + bytes(bad))
    assert decoder.failed is not None
    with pytest.raises(FrameError, match="checksum"):
        decoder.feed(ping(10))


def test_decoder_rejects_wrong_magic_early() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\xca\xfe") == []
    with pytest.raises(FrameError) as info:
        decoder.feed(b"X")
    assert info.value.check == "magic"


@given(st.binary(max_size=64), st.lists(st.integers(min_value=0), max_size=10))
def test_decoder_outcome_does_not_depend_on_chunking(data: bytes, points: list[int]) -> None:
    def run(chunks: list[bytes]) -> tuple[list[Frame], str | None]:
        decoder, got = FrameDecoder(), list[Frame]()
        try:
            for chunk in chunks:
                got += decoder.feed(chunk)
        except FrameError as exc:
            return [], exc.check
        return got, None

    whole = run([data])
    assert run(_cuts(data, points)) == whole
