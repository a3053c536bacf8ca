"""Byte-exact traffic for forwarding tests: a client and an upstream that both talk at once.

The client sends an 8-byte header (nonce, reply length) then its body; the upstream starts
streaming its reply as soon as it has the header, while it keeps reading. Both sides hash what
they receive, so any lost, duplicated or reordered byte shows up as a digest mismatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import struct
from dataclasses import dataclass

BLOCK = os.urandom(9 * 1024 * 1024)
_MAX = 4 * 1024 * 1024
_CHUNK = 256 * 1024


def body(nonce: int, length: int, salt: int) -> memoryview:
    """`length` (<= 4 MiB) deterministic random bytes for this nonce."""
    offset = (nonce * 7919 + salt * 104729) % (len(BLOCK) - _MAX)
    return memoryview(BLOCK)[offset : offset + length]


@dataclass
class Received:
    nbytes: int
    digest: str


class PayloadUpstream:
    """Reads a client's header, streams the reply at once, records what it received by nonce."""

    def __init__(self) -> None:
        self.received: dict[int, Received] = {}
        self.errors: list[str] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> PayloadUpstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await reader.readexactly(8)
            nonce, reply_len = struct.unpack("!II", header)
            sender = asyncio.ensure_future(_send(writer, body(nonce, reply_len, 2)))
            h = hashlib.sha256(header)
            n = 8
            while data := await reader.read(_CHUNK):
                h.update(data)
                n += len(data)
            self.received[nonce] = Received(n, h.hexdigest())
            await sender
            writer.write_eof()
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.errors.append(repr(exc))
        finally:
            writer.close()


async def _send(writer: asyncio.StreamWriter, data: memoryview) -> None:
    for i in range(0, len(data), _CHUNK):
        writer.write(data[i : i + _CHUNK])
        await writer.drain()


@dataclass
class Exchange:
    nonce: int
    sent: int
    sent_digest: str
    reply_ok: bool
    reply_len: int


async def exchange(port: int, nonce: int, send_len: int, reply_len: int) -> Exchange:
    """One client: send header+body and half-close, while reading the whole reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    header = struct.pack("!II", nonce, reply_len)
    payload = body(nonce, send_len, 1)
    sent_digest = hashlib.sha256(header)
    sent_digest.update(payload)

    async def send() -> None:
        writer.write(header)
        await _send(writer, payload)
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    got = hashlib.sha256()
    n = 0
    try:
        while data := await reader.read(_CHUNK):
            got.update(data)
            n += len(data)
        await sender
    finally:
        sender.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    expected = hashlib.sha256(body(nonce, reply_len, 2)).hexdigest()
    return Exchange(nonce, 8 + send_len, sent_digest.hexdigest(), got.hexdigest() == expected, n)
