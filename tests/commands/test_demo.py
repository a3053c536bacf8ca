"""`connwatch demo` as a newcomer runs it: one command, a metrics URL within seconds, exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.support import eventually, parse_metrics

_URL = re.compile(rb"(http://127\.0\.0\.1:(\d+))/metrics")


class Demo:
    """`python -m connwatch demo --duration S` with stdout read line by line (not a TTY)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out = b""

    @classmethod
    async def start(cls, duration: str) -> Demo:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "connwatch",
            "demo",
            "--duration",
            duration,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        return cls(proc)

    async def wait_for(self, pattern: re.Pattern[bytes], timeout: float) -> re.Match[bytes]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while not (found := pattern.search(self.out)):
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"demo ended before {pattern.pattern!r}:\n{self.out!r}")
                self.out += line
        return found

    async def finish(self, timeout: float) -> tuple[int, bytes]:
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            self.out += await self.proc.stdout.read()
            code = await self.proc.wait()
        return code, await self.proc.stderr.read()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def _metrics(base: str) -> dict[str, float]:
    def get() -> str:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            return str(response.read().decode())

    return parse_metrics(await asyncio.to_thread(get))


_ACCEPTED = 'connwatch_connections_accepted_total{listener="demo"}'


@pytest.mark.slow
async def test_demo_prints_the_metrics_url_serves_it_and_exits_0() -> None:
    started = time.monotonic()
    demo = await Demo.start("6")
    try:
        found = await demo.wait_for(_URL, timeout=10)
        assert time.monotonic() - started < 10
        base = found.group(1).decode()
        first = await _metrics(base)
        assert any(name.startswith("connwatch_build_info{") for name in first)
        before = first.get(_ACCEPTED, 0.0)

        async def grew() -> bool:
            return (await _metrics(base))[_ACCEPTED] > before

        await eventually(grew, timeout=5, interval=0.2)
        # The stalled reader shows as zero_window in the periodic summaries.
        await demo.wait_for(re.compile(rb"zero_window=1"), timeout=5)
        code, err = await demo.finish(timeout=15)
        assert code == 0, err.decode()
        assert b"demo finished" in demo.out
        assert err == b""
    finally:
        await demo.kill()


@pytest.mark.slow
async def test_demo_moves_the_admin_endpoint_when_9464_is_taken() -> None:
    blocker = socket.socket()
    with contextlib.ExitStack() as stack:
        stack.callback(blocker.close)
        # SO_REUSEADDR: earlier runs may leave TIME_WAIT entries on the port, no listener.
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            blocker.bind(("127.0.0.1", 9464))
            blocker.listen()
        except OSError:
            pass  # someone else listens there: the demo must move all the same
        demo = await Demo.start("2")
        try:
            found = await demo.wait_for(_URL, timeout=10)
            assert int(found.group(2)) != 9464
            assert b"9464 is taken" in demo.out
            assert (await _metrics(found.group(1).decode())).get(_ACCEPTED) is not None
            code, err = await demo.finish(timeout=15)
            assert code == 0, err.decode()
        finally:
            await demo.kill()
