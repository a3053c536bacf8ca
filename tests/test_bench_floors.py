"""bench/floors.py: the minimal forwarders that stand for Python's floor are real forwarders.

A floor that lost or reordered bytes, or left connections open, would make connwatch look
worse than it is; these run each one in front of an echo upstream.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.support import LOOPBACK, EchoUpstream, free_port

FLOORS = Path(__file__).resolve().parent.parent / "bench" / "floors.py"


@asynccontextmanager
async def floor(kind: str, upstream: int, workers: int) -> AsyncIterator[int]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(FLOORS), kind, str(port), str(upstream), "--workers", str(workers)
    )
    try:
        for _ in range(200):  # until it listens (each try is one connect)
            try:
                _, writer = await asyncio.open_connection(LOOPBACK, port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
        else:
            pytest.fail(f"{kind} floor did not listen")
        yield port
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def _round_trip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(payload)
    writer.write_eof()  # half-close: the echo comes back, then EOF
    echoed = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return echoed


@pytest.mark.parametrize(("kind", "workers"), [("protocol", 1), ("splice", 2)])
async def test_floor_forwards_byte_exact_with_half_close(kind: str, workers: int) -> None:
    async with EchoUpstream() as up, floor(kind, up.port, workers) as port:
        big = os.urandom(4 * 1024 * 1024)
        assert await _round_trip(port, big) == big
        small = [os.urandom(100 + i) for i in range(200)]
        echoed = await asyncio.gather(*(_round_trip(port, p) for p in small))
        assert echoed == small
        for _ in range(100):  # every connection is closed upstream too
            if up.open == 0:
                break
            await asyncio.sleep(0.05)
        assert up.open == 0
