"""The warm pool in front of a real redis-server (Debian package), SPEC section 9.

Redis closes a client idle longer than its `timeout` (1 s here), which is what a pool with a
`max_idle_age` above it (60 s) must survive: dead pooled connections are found by the check before
use or by a scan (`peer_closed`), never handed to a client; `validate: probe` sends PING and eats
the PONG so that a client never sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.proxy.test_warm_pool import pool_listener, pool_of
from tests.support import LOOPBACK, daemon_config, eventually, free_port, running_daemon

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


@contextlib.asynccontextmanager
async def redis_server(tmp_path: Path, timeout: int = 1) -> AsyncIterator[str]:
    """redis-server on a loopback port with an idle `timeout`, nothing saved; its address."""
    port = free_port()  # redis cannot bind port 0 and report it
    proc = await asyncio.create_subprocess_exec(
        "redis-server",
        "--port", str(port), "--bind", LOOPBACK, "--timeout", str(timeout),
        "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
        "--loglevel", "warning", "--protected-mode", "no",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        async def answers() -> bool:
            try:
                return await redis_commands(port, [b"PING"]) == [b"+PONG"]
            except OSError:
                return False

        await eventually(answers, timeout=10, interval=0.05)
        yield f"{LOOPBACK}:{port}"
    finally:
        proc.terminate()
        async with asyncio.timeout(10):
            await proc.wait()


async def redis_commands(port: int, commands: list[bytes]) -> list[bytes]:
    """Inline commands on one connection; the first line of each reply (bulk: its value)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    replies = []
    try:
        async with asyncio.timeout(5):
            for command in commands:
                writer.write(command + b"\r\n")
                line = (await reader.readline()).rstrip(b"\r\n")
                if line.startswith(b"$") and line != b"$-1":
                    line = (await reader.readline()).rstrip(b"\r\n")
                replies.append(line)
            # Nothing more may come: e.g. a probe's PONG left in the stream.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.02):
                    extra = await reader.read(100)
                    replies.append(b"EXTRA:" + extra) if extra else None
    finally:
        writer.close()
    return replies


def ping_set_get(i: int) -> tuple[list[bytes], list[bytes]]:
    value = b"v%d" % i
    return [b"PING", b"SET k%d %s" % (i, value), b"GET k%d" % i], [b"+PONG", b"+OK", value]


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_redis_behind_the_pool_with_an_idle_timeout_below_max_idle_age(
    tmp_path: Path,
) -> None:
    """50 clients arriving 1.5 s apart (more than redis' 1 s timeout, so pooled connections die
    between clients), each PING/SET/GET: no failure, dead ones evicted peer_closed, hits > 0."""
    async with redis_server(tmp_path) as address:
        cfg = pool_listener(
            [address], min_idle=2, max_idle_age="60s", scan_interval="250ms",
            scan_max_interval="1s",
        )  # fmt: skip
        async with running_daemon(daemon_config(cfg)) as daemon:
            port = daemon.listeners["app"].port
            await eventually(lambda: pool_of(daemon, address).idle == 2)
            failures: list[Any] = []
            started = time.monotonic()
            for i in range(50):
                await asyncio.sleep(max(0.0, started + 1.5 * i - time.monotonic()))
                commands, expected = ping_set_get(i)
                try:
                    got = await redis_commands(port, commands)
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    got = [repr(exc).encode()]
                if got != expected:
                    failures.append((i, got))
            assert time.monotonic() - started < 90
            pool = pool_of(daemon, address)
            assert failures == [], (failures, pool)
            assert pool.evictions.get("peer_closed", 0) > 0, pool
            assert pool.hits > 0, pool
            closed = daemon.statistics().listeners["app"].closed
            assert closed.get("upstream_connect_failed", 0) == 0


async def test_redis_probe_reply_is_consumed_and_a_wrong_reply_evicts(tmp_path: Path) -> None:
    async with redis_server(tmp_path, timeout=0) as address:
        # Right expectation: probed connections stay and are lent; the PONG is not forwarded.
        cfg = pool_listener(
            [address], min_idle=2, grow=False, validate="probe", scan_interval="100ms",
            scan_max_interval="100ms",
        )  # fmt: skip
        cfg["health_check"] = {"enabled": False, "timeout": "1s"}
        async with running_daemon(daemon_config(cfg)) as daemon:
            port = daemon.listeners["app"].port
            warm = daemon.listeners["app"].warm
            assert warm is not None
            await eventually(lambda: warm.scans >= 3 and pool_of(daemon, address).idle == 2)
            for i in range(3):
                commands, expected = ping_set_get(i)
                assert await redis_commands(port, commands) == expected
            pool = pool_of(daemon, address)
            assert pool.hits == 3
            assert pool.evictions.get("probe_failed", 0) == 0
        # Wrong expectation: every probed connection is evicted probe_failed; clients are fine.
        cfg["upstream_pool"]["probe"] = {"send": "PING\\r\\n", "expect": "+WRONG"}
        async with running_daemon(daemon_config(cfg)) as daemon:
            port = daemon.listeners["app"].port
            await eventually(lambda: pool_of(daemon, address).evictions.get("probe_failed", 0) >= 4)
            for i in range(3):
                commands, expected = ping_set_get(i)
                assert await redis_commands(port, commands) == expected
