"""Upstream health end to end: the daemon subprocess checks real loopback servers.

For each check type a target goes DOWN and comes back UP within the bounds of issue 4, seen
from the outside: the `upstream_state_changed` log line, `connwatch_upstream_up` and `/readyz`.
Also: a heartbeat target answering with a bad checksum, and the `admin.heartbeat_listen`
responder (probed by `connwatch probe`, fed garbage).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connwatch._types import Address
from connwatch.wire.heartbeat_frame import FRAME_SIZE, decode, pong_for
from tests.health.test_health import Handler, bad_checksum_pong, serving, silent
from tests.support import (
    DaemonProcess,
    EchoUpstream,
    daemon_config,
    eventually,
    listener_config,
    run_probe,
)

INTERVAL, TIMEOUT, RISE, FALL = 0.1, 0.3, 2, 3
DOWN_WITHIN = FALL * INTERVAL + TIMEOUT + 1  # issue 4, "Done when"
UP_WITHIN = RISE * INTERVAL + 1


def health_check(kind: str, **extra: Any) -> dict[str, Any]:
    """Fast checks; max_interval = interval so the bounds above hold from any moment."""
    return {
        "type": kind,
        "interval": f"{INTERVAL * 1000:g}ms",
        "max_interval": f"{INTERVAL * 1000:g}ms",
        "timeout": f"{TIMEOUT * 1000:g}ms",
        "rise": RISE,
        "fall": FALL,
        **extra,
    }


def up_metric(listener: str, upstream: str) -> str:
    return f'connwatch_upstream_up{{listener="{listener}",upstream="{upstream}"}}'


RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
HEARTBEAT_ERRORS = 'connwatch_protocol_errors_total{kind="heartbeat_frame"}'


async def readyz(daemon: DaemonProcess) -> tuple[int, dict[str, Any]]:
    status, body = await daemon.get("/readyz")
    parsed: dict[str, Any] = json.loads(body)
    return status, parsed


# -- targets whose answer a test can flip -----------------------------------------------------


@dataclass
class Switch:
    healthy: bool = True
    answered: int = 0  # requests seen (http, send_expect, heartbeat)


def flippable(kind: str, switch: Switch) -> Handler:
    """A server for check `kind` that answers right while `switch.healthy`, wrongly otherwise."""

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        switch.answered += 1
        status = "200 OK" if switch.healthy else "503 Service Unavailable"
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()

    async def send_expect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n")
        switch.answered += 1
        writer.write(b"+PONG\r\n" if switch.healthy else b"-ERR not ready\r\n")
        await writer.drain()

    async def heartbeat(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frame = decode(await reader.readexactly(FRAME_SIZE))
        switch.answered += 1
        if switch.healthy:
            writer.write(pong_for(frame))
            await writer.drain()
        await silent(reader, writer)  # unhealthy: never answers, the check times out

    handlers: dict[str, Handler] = {
        "tcp": silent,
        "http": http,
        "send_expect": send_expect,
        "heartbeat": heartbeat,
    }
    return handlers[kind]


class Target:
    """One check target; `down()`/`up()` flip its answer, or for `tcp` stop and restart it on
    the same port (nothing listening there in between: connections are refused)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.switch = Switch()
        self.handler = flippable(kind, self.switch)
        self.address = Address("127.0.0.1", 0)
        self._server: contextlib.AbstractAsyncContextManager[Address] | None = None

    async def _listen(self, port: int) -> None:
        self._server = serving(self.handler, port=port)
        self.address = await self._server.__aenter__()

    async def _stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.__aexit__(None, None, None)

    async def down(self) -> None:
        if self.kind == "tcp":
            await self._stop()
        self.switch.healthy = False

    async def up(self) -> None:
        self.switch.healthy = True
        if self.kind == "tcp":
            await self._listen(self.address.port)


@contextlib.asynccontextmanager
async def target(kind: str) -> AsyncIterator[Target]:
    t = Target(kind)
    await t._listen(0)
    try:
        yield t
    finally:
        await t._stop()


# -- each check type: DOWN, then UP, in time ----------------------------------------------------


async def assert_state(daemon: DaemonProcess, upstream: str, state: str) -> dict[str, Any]:
    metrics = await daemon.metrics()
    assert metrics[up_metric("app", upstream)] == (0 if state == "DOWN" else 1)
    status, body = await readyz(daemon)
    assert status == (503 if state == "DOWN" else 200), body
    assert body["status"] == ("DOWN" if state == "DOWN" else "UP")
    app = body["listeners"]["app"]
    assert app["status"] == body["status"]
    seen: dict[str, Any] = app["upstreams"][upstream]
    assert seen["status"] == state
    assert RFC3339_MS.fullmatch(seen["last_check"]), seen
    return seen


@pytest.mark.parametrize("kind", ["tcp", "http", "send_expect", "heartbeat"])
async def test_target_goes_down_and_comes_back_in_time(kind: str, tmp_path: Path) -> None:
    async with target(kind) as t:
        upstream = str(t.address)
        cfg = daemon_config(listener_config("app", [upstream], health_check=health_check(kind)))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            first = await daemon.wait_for("upstream_state_changed", new="UP")
            assert (first["listener"], first["upstream"], first["old"]) == (
                "app",
                upstream,
                "UNKNOWN",
            )
            seen = await assert_state(daemon, upstream, "UP")
            assert seen["consecutive_failures"] == 0
            assert isinstance(seen["latency_ms"], int | float)

            went_down = time.monotonic()
            await t.down()
            line = await daemon.wait_for("upstream_state_changed", new="DOWN", timeout=10)
            took = time.monotonic() - went_down
            assert took < DOWN_WITHIN, f"DOWN after {took:.2f}s, bound {DOWN_WITHIN:.2f}s"
            assert (line["old"], line["level"], line["upstream"]) == ("UP", "warning", upstream)
            seen = await assert_state(daemon, upstream, "DOWN")
            assert seen["consecutive_failures"] >= FALL
            assert seen["latency_ms"] is None

            came_back = time.monotonic()
            await t.up()
            line = await daemon.wait_for("upstream_state_changed", new="UP", count=2, timeout=10)
            took = time.monotonic() - came_back
            assert took < UP_WITHIN, f"UP after {took:.2f}s, bound {UP_WITHIN:.2f}s"
            assert line["old"] == "DOWN"
            seen = await assert_state(daemon, upstream, "UP")
            assert seen["consecutive_failures"] == 0
            metrics = await daemon.metrics()
    # One line per change, none while the state held.
    changes = [(c["old"], c["new"]) for c in daemon.find("upstream_state_changed")]
    assert changes == [("UNKNOWN", "UP"), ("UP", "DOWN"), ("DOWN", "UP")]
    assert metrics[HEARTBEAT_ERRORS] == 0  # a silent or wrong answer is no frame error


def checks_metric(upstream: str, result: str) -> str:
    return (
        f'connwatch_health_checks_total{{listener="app",result="{result}",upstream="{upstream}"}}'
    )


async def test_health_check_metrics_count_every_check(tmp_path: Path) -> None:
    async with target("tcp") as t:
        upstream = str(t.address)
        cfg = daemon_config(listener_config("app", [upstream], health_check=health_check("tcp")))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            await daemon.wait_for("upstream_state_changed", new="UP")
            await t.down()
            await daemon.wait_for("upstream_state_changed", new="DOWN", timeout=10)
            metrics = await daemon.metrics()
    assert metrics[checks_metric(upstream, "success")] >= RISE
    assert metrics[checks_metric(upstream, "failure")] >= FALL
    duration = (
        f'connwatch_health_check_duration_seconds_count{{listener="app",upstream="{upstream}"}}'
    )
    assert metrics[duration] >= RISE + FALL


async def test_a_stable_target_is_still_noticed_within_max_interval(tmp_path: Path) -> None:
    """With max_interval > interval, passing checks stretch the wait; once it has reached
    max_interval a failure is seen within max_interval (+10% jitter) + (fall - 1) x interval +
    timeout (+1 s), the bound docs/health-checks.md gives."""
    interval, max_interval = 0.05, 0.4
    hc = health_check("http", interval="50ms", max_interval="400ms")
    async with target("http") as t:
        upstream = str(t.address)
        cfg = daemon_config(listener_config("app", [upstream], health_check=hc))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            await daemon.wait_for("upstream_state_changed", new="UP")
            # 0.05 x 1.5^5 > 0.4: after rise + 5 passing checks the wait is max_interval.
            await eventually(lambda: t.switch.answered >= RISE + 5)
            went_down = time.monotonic()
            await t.down()
            await daemon.wait_for("upstream_state_changed", new="DOWN", timeout=10)
            took = time.monotonic() - went_down
    bound = max_interval * 1.1 + (FALL - 1) * interval + TIMEOUT + 1
    assert took < bound, f"DOWN after {took:.2f}s, bound {bound:.2f}s"


# -- heartbeat: a bad frame from the target --------------------------------------------------------


async def test_bad_checksum_marks_the_target_down_and_the_daemon_runs_on(tmp_path: Path) -> None:
    async with serving(bad_checksum_pong) as bad, EchoUpstream() as echo:
        cfg = daemon_config(
            listener_config("hb", [str(bad)], health_check=health_check("heartbeat")),
            listener_config("echo", [echo.address]),
        )
        async with DaemonProcess(tmp_path, cfg) as daemon:
            line = await daemon.wait_for("upstream_state_changed", listener="hb", new="DOWN")
            assert line["old"] == "UNKNOWN"
            assert line["detail"].startswith("bad heartbeat frame: ")
            first = (await daemon.metrics())[HEARTBEAT_ERRORS]
            assert first >= FALL
            status, body = await readyz(daemon)
            assert status == 503
            assert body["listeners"]["hb"]["upstreams"][str(bad)]["status"] == "DOWN"
            assert body["listeners"]["echo"]["status"] == "UP"  # checks off there

            # It keeps checking, counting each bad frame, and keeps serving.
            assert await daemon.get("/healthz") == (200, b'{"status":"UP"}')
            reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port("echo"))
            writer.write(b"still proxying")
            assert await reader.readexactly(14) == b"still proxying"
            writer.close()
            await writer.wait_closed()
            more = await wait_metric_above(daemon, HEARTBEAT_ERRORS, first)
            assert more > first
        assert daemon.proc is not None
        assert daemon.proc.returncode == 0  # a clean shutdown, no crash
    assert daemon.find("upstream_state_changed", listener="hb") == [line]


async def wait_metric_above(
    daemon: DaemonProcess, key: str, floor: float, timeout: float = 10
) -> float:
    """Scrape until `key` exceeds `floor` (a counter is only visible by polling)."""

    async def above() -> float | None:
        value = (await daemon.metrics())[key]
        return value if value > floor else None

    result: float = await eventually(above, timeout=timeout, interval=INTERVAL)
    return result


# -- admin.heartbeat_listen ----------------------------------------------------------------------


async def test_heartbeat_listen_answers_probe_and_counts_garbage(tmp_path: Path) -> None:
    async with EchoUpstream() as echo:
        admin = {"listen": "127.0.0.1:0", "heartbeat_listen": "127.0.0.1:0"}
        cfg = daemon_config(listener_config("app", [echo.address]), admin=admin)
        async with DaemonProcess(tmp_path, cfg) as daemon:
            started = daemon.find("heartbeat_responder_started")
            assert len(started) == 1
            port = int(started[0]["port"])
            probed = await run_probe(f"127.0.0.1:{port}", "--type", "heartbeat")
            out = probed.stdout + probed.stderr
            assert probed.returncode == 0, out
            assert out.startswith("healthy "), out
            assert "PONG in " in out

            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GARBAGE-NOT-A-FRAME!")  # 20 bytes: the first 16 fail the magic
            await writer.drain()
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # the responder hangs up on us
            writer.close()
            line = await daemon.wait_for("protocol_error", kind="heartbeat_frame")
            assert "magic" in line["error"]
            assert (await daemon.metrics())[HEARTBEAT_ERRORS] == 1

            probed = await run_probe(f"127.0.0.1:{port}", "--type", "heartbeat")
            assert probed.returncode == 0, probed.stdout + probed.stderr  # still answering
            assert await daemon.get("/healthz") == (200, b'{"status":"UP"}')
