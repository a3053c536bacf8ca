"""A real Prometheus server scrapes a real connwatch daemon on loopback.

Proves the operator path end to end: the admin endpoint's exposition is accepted by Prometheus,
and the values arrive as SPEC section 5 defines them (one open connection -> active 1; the bytes
of a closed exchange counted exactly; 0 again once the client leaves).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml

PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus server binary is not installed"),
]

try:
    import connwatch.cli  # noqa: F401  # the daemon under test
except ImportError:
    pytest.skip(
        "connwatch.cli cannot be imported yet: no daemon to scrape", allow_module_level=True
    )

START_TIMEOUT_S = 30.0
QUERY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.2
PAYLOAD = b"ping\n"

T = TypeVar("T")


def free_port() -> int:
    """A loopback port free right now. Racy by nature, but connwatch and Prometheus take their
    addresses as arguments and do not report back a port 0 binding."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def poll(
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout: float,
    what: str,
    alive: Callable[[], str | None] = lambda: None,
) -> T:
    """Await `probe` until it returns a value, within `timeout`; fail early if `alive` reports
    that a process we depend on has died. Polling is the only option here: these are other
    processes' HTTP APIs, with nothing to await."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error = "no answer"
    while loop.time() < deadline:
        if (death := alive()) is not None:
            pytest.fail(f"while waiting for {what}: {death}")
        try:
            result = await probe()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            last_error = repr(exc)
        else:
            if result is not None:
                return result
            last_error = "not yet"
        await asyncio.sleep(POLL_INTERVAL_S)
    pytest.fail(f"timed out after {timeout}s waiting for {what} ({last_error})")


async def stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM (the graceful path for both programs), then SIGKILL if it lingers."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()


def tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def exited(process: asyncio.subprocess.Process, log: Path) -> Callable[[], str | None]:
    def check() -> str | None:
        if process.returncode is None:
            return None
        return f"process exited with {process.returncode}:\n{tail(log)}"

    return check


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def running(
    argv: list[str], log: Path, env: dict[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env
        )
        try:
            yield process
        finally:
            await stop(process)


def daemon_env(admin_port: int) -> dict[str, str]:
    # Drop the caller's CONNWATCH_* settings: the test defines the whole configuration.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNWATCH_")}
    env["CONNWATCH_ADMIN__LISTEN"] = f"127.0.0.1:{admin_port}"
    return env


def prometheus_config(path: Path, admin_port: int) -> None:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "connwatch",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}],
            }
        ],
    }
    path.write_text(yaml.safe_dump(config))


class PromAPI:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def ready(self) -> bool | None:
        async with self.session.get(f"{self.base}/-/ready") as response:
            return True if response.status == 200 else None

    async def query(self, promql: str) -> list[dict[str, Any]]:
        async with self.session.get(
            f"{self.base}/api/v1/query", params={"query": promql}
        ) as response:
            body = await response.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def values(self, promql: str) -> dict[str, float]:
        """Instant query -> {"label=value,...": sample value}, labels sorted."""
        return {
            ",".join(f"{k}={v}" for k, v in sorted(s["metric"].items())): float(s["value"][1])
            for s in await self.query(promql)
        }

    async def target_health(self) -> str:
        async with self.session.get(f"{self.base}/api/v1/targets") as response:
            body = await response.json()
        targets = body["data"]["activeTargets"]
        return "; ".join(f"{t['scrapeUrl']}: {t['health']} {t['lastError']}" for t in targets)


async def test_prometheus_scrapes_connwatch(tmp_path: Path) -> None:
    assert PROMETHEUS is not None
    listen_port, admin_port, prom_port = free_port(), free_port(), free_port()
    daemon_log, prom_log = tmp_path / "connwatch.log", tmp_path / "prometheus.log"
    prom_config = tmp_path / "prometheus.yml"
    prometheus_config(prom_config, admin_port)
    timeout = aiohttp.ClientTimeout(total=5)

    async with (
        echo_server() as upstream_port,
        aiohttp.ClientSession(timeout=timeout) as session,
        running(
            [
                sys.executable,
                "-m",
                "connwatch",
                "run",
                "--listen",
                f"127.0.0.1:{listen_port}",
                "--upstream",
                f"127.0.0.1:{upstream_port}",
            ],
            daemon_log,
            env=daemon_env(admin_port),
        ) as daemon,
    ):
        daemon_dead = exited(daemon, daemon_log)

        async def healthz() -> bool | None:
            async with session.get(f"http://127.0.0.1:{admin_port}/healthz") as response:
                return True if response.status == 200 else None

        await poll(healthz, timeout=START_TIMEOUT_S, what="connwatch /healthz", alive=daemon_dead)

        reader, writer = await poll(
            lambda: asyncio.open_connection("127.0.0.1", listen_port),
            timeout=START_TIMEOUT_S,
            what="connwatch listener",
            alive=daemon_dead,
        )
        try:
            writer.write(PAYLOAD)
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(len(PAYLOAD)), 10) == PAYLOAD

            async with running(
                [
                    PROMETHEUS,
                    f"--config.file={prom_config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                prom_log,
            ) as prometheus:
                prom = PromAPI(session, f"http://127.0.0.1:{prom_port}")
                prom_dead = exited(prometheus, prom_log)

                def anyone_dead() -> str | None:
                    return daemon_dead() or prom_dead()

                await poll(prom.ready, timeout=START_TIMEOUT_S, what="prometheus", alive=prom_dead)

                async def sample(promql: str, expected: float) -> dict[str, float] | None:
                    values = await prom.values(promql)
                    return (
                        values if values and all(v == expected for v in values.values()) else None
                    )

                async def await_sample(promql: str, expected: float) -> dict[str, float]:
                    try:
                        return await poll(
                            lambda: sample(promql, expected),
                            timeout=QUERY_TIMEOUT_S,
                            what=f"{promql} == {expected}",
                            alive=anyone_dead,
                        )
                    except pytest.fail.Exception:
                        raise AssertionError(
                            f"{promql}: {await prom.values(promql)}\n"
                            f"targets: {await prom.target_health()}\n"
                            f"connwatch log:\n{tail(daemon_log)}\nprometheus log:\n{tail(prom_log)}"
                        ) from None

                active = await await_sample(
                    'connwatch_connections_active{job="connwatch",listener="default"}', 1
                )
                (series,) = active
                assert f"instance=127.0.0.1:{admin_port}" in series
                # Byte counters are exact and include what an open connection has moved so far.
                moved = await await_sample(
                    'connwatch_bytes_total{job="connwatch",listener="default"}', len(PAYLOAD)
                )
                assert {key.split("direction=")[1].split(",")[0] for key in moved} == {
                    "client_to_upstream",
                    "upstream_to_client",
                }

                writer.close()
                await writer.wait_closed()
                await await_sample(
                    'connwatch_connections_active{job="connwatch",listener="default"}', 0
                )
                await await_sample(
                    'sum(connwatch_connections_closed_total{job="connwatch",listener="default"})',
                    1,
                )
        finally:
            writer.close()
