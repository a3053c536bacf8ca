"""bench/floors.py: the minimal forwarders that stand for Python's floor are real forwarders.

A floor that lost or reordered bytes, or left connections open, would make connwatch look
worse than it is; these run each one in front of an echo upstream.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.support import LOOPBACK, EchoUpstream, free_port

FLOORS = Path(__file__).resolve().parents[2] / "bench" / "floors.py"


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


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind (Debian package)")
@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="needs redis-benchmark")
def test_instruction_counts_are_per_unit_and_repeat() -> None:
    """bench/instructions.py counts only the measured load: twice the load, twice the count."""
    script = Path(__file__).resolve().parents[2] / "bench" / "instructions.py"

    def counts(conns: int, requests: int) -> list[float]:
        argv = [sys.executable, str(script), "--proxies", "py-protocol"]
        argv += ["--conns", str(conns), "--requests", str(requests)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
        row = [line for line in out.stdout.splitlines() if line.startswith("| py-protocol")]
        return [float(cell) for cell in row[0].strip("| ").split("|")[1:]]

    small, large = counts(100, 5000), counts(200, 10000)  # 50 connection set-ups in rr: amortised
    assert all(value > 0 for value in small)
    for a, b in zip(small, large, strict=True):  # per connection / per request: stable
        assert abs(a - b) / a < 0.15, (small, large)
