"""The 16-byte heartbeat frame (SPEC section 7): a pure codec, no I/O.

Layout, big-endian::

    0-3    magic 0xCAFEBABE
    4      high nibble version (1), low nibble type (1 PING, 2 PONG)
    5-12   timestamp, unsigned milliseconds since the Unix epoch (a PONG echoes its PING's)
    13-15  low 24 bits of zlib.crc32 over bytes 0-12

`decode` checks one complete frame; `FrameDecoder` cuts a byte stream into frames.
"""

from __future__ import annotations

import enum
import struct
import time
import zlib
from dataclasses import dataclass

from connwatch.exceptions import FrameError

__all__ = [
    "FRAME_SIZE",
    "MAGIC",
    "VERSION",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "decode",
    "encode",
    "now_ms",
    "ping",
    "pong_for",
]

MAGIC = 0xCAFEBABE
VERSION = 1
FRAME_SIZE = 16
MAX_TIMESTAMP = 2**64 - 1

_MAGIC_BYTES = MAGIC.to_bytes(4, "big")
_HEAD = struct.Struct(">IBQ")  # magic, version/type byte, timestamp: bytes 0-12
_CHECKED = _HEAD.size  # 13: the checksum covers these bytes
_CRC_MASK = 0xFFFFFF


class FrameType(enum.IntEnum):
    PING = 1
    PONG = 2


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    timestamp_ms: int

    def __post_init__(self) -> None:
        # Reject what encode() could not represent, at construction rather than on the wire.
        if not isinstance(self.type, FrameType):
            raise ValueError(f"frame type must be a FrameType, not {self.type!r}")
        if not 0 <= self.timestamp_ms <= MAX_TIMESTAMP:
            raise ValueError(f"timestamp_ms {self.timestamp_ms} is outside 0..2**64-1")


def _checksum(head: bytes) -> int:
    return zlib.crc32(head) & _CRC_MASK


def encode(frame: Frame) -> bytes:
    head = _HEAD.pack(MAGIC, (VERSION << 4) | int(frame.type), frame.timestamp_ms)
    return head + _checksum(head).to_bytes(3, "big")


def decode(data: bytes | bytearray | memoryview) -> Frame:
    """Decode exactly one frame; FrameError says which check failed."""
    raw = bytes(data)
    if len(raw) != FRAME_SIZE:
        raise FrameError("length", f"expected {FRAME_SIZE} bytes, got {len(raw)}")
    magic, version_type, timestamp = _HEAD.unpack_from(raw)
    if magic != MAGIC:
        raise FrameError("magic", f"expected 0x{MAGIC:08X}, got 0x{magic:08X}")
    version, type_code = version_type >> 4, version_type & 0x0F
    if version != VERSION:
        raise FrameError("version", f"expected {VERSION}, got {version}")
    if type_code not in (FrameType.PING.value, FrameType.PONG.value):
        raise FrameError("type", f"expected 1 (PING) or 2 (PONG), got {type_code}")
    expected, got = _checksum(raw[:_CHECKED]), int.from_bytes(raw[_CHECKED:], "big")
    if got != expected:
        raise FrameError("checksum", f"expected 0x{expected:06X}, got 0x{got:06X}")
    return Frame(FrameType(type_code), timestamp)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def now_ms() -> int:
    """Milliseconds since the Unix epoch, the frame's timestamp unit."""
    return _wall_ms()


def ping(now_ms: int | None = None) -> bytes:
    """An encoded PING stamped `now_ms` (default: the current time)."""
    return encode(Frame(FrameType.PING, _wall_ms() if now_ms is None else now_ms))


def pong_for(ping: Frame) -> bytes:
    """The encoded PONG answering `ping`: same timestamp. ValueError if it is not a PING."""
    if ping.type is not FrameType.PING:
        raise ValueError(f"only a PING is answered, got {ping.type.name}")
    return encode(Frame(FrameType.PONG, ping.timestamp_ms))


class FrameDecoder:
    """Incremental decoder: buffers partial frames across `feed` calls.

    The first bad frame raises FrameError and the decoder stays failed: every later `feed`
    raises the same error, because a stream cannot be resynchronised after a bad frame.
    Frames decoded earlier in the failing call are dropped with it (the caller closes the
    connection anyway). A wrong magic is reported as soon as its first bytes arrive, so a
    peer speaking another protocol is not held open waiting for 16 bytes.
    """

    __slots__ = ("_buffer", "_error")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._error: FrameError | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered towards the next frame."""
        return len(self._buffer)

    @property
    def failed(self) -> FrameError | None:
        """The error that stopped this decoder, or None."""
        return self._error

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._error is not None:
            raise self._error
        self._buffer += data
        try:
            return self._drain()
        except FrameError as exc:
            self._error = exc
            self._buffer.clear()
            raise

    def _drain(self) -> list[Frame]:
        frames: list[Frame] = []
        buf = self._buffer
        offset = 0
        while len(buf) - offset >= FRAME_SIZE:
            frames.append(decode(buf[offset : offset + FRAME_SIZE]))
            offset += FRAME_SIZE
        del buf[:offset]
        head = bytes(buf[:4])
        if head != _MAGIC_BYTES[: len(head)]:
            got = head.hex().upper()
            raise FrameError("magic", f"expected 0x{MAGIC:08X}, got bytes 0x{got}...")
        return frames
