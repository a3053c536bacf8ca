"""Passive health and slow start end to end (SPEC sections 4, 5, 6, 10): the daemon as a
subprocess in front of loopback upstreams that reset every connection at once, on both data
paths and with `workers: 2`; ejections, their doubling, the max_ejection_percent budget, the
`/upstreams` fields, the ejections metric and a returning target's slow start."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
from pathlib import Path
from typing import Any

import pytest

from connwatch.proxy.splice import SPLICE_AVAILABLE
from tests.support import (
    LOOPBACK,
    DaemonProcess,
    daemon_config,
    eventually,
    listener_config,
    reset,
)
from tests.variant import skip_under

_RELAYED_OUTCOMES = skip_under(
    "workers2",
    "the primary ejects on outcomes the workers relay, counted at most one collection late "
    "(docs/health-checks.md, Workers), so more than the threshold may reach the target; "
    "test_workers_report_outcomes_to_the_primary_which_ejects_for_all covers workers",
)


class Upstream:
    """A loopback server that, while `resetting`, resets each connection as soon as it is
    accepted, and otherwise answers a client's first line with its own name and stays open
    until the other side closes.
    `accepts` holds the wall-clock time of every accepted connection."""

    def __init__(self, name: str, *, resetting: bool) -> None:
        self.name = name
        self.resetting = resetting
        self.accepts: list[float] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"{LOOPBACK}:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts.append(time.time())
        if self.resetting:
            reset(writer)
            return
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(5):
                await reader.readline()
                writer.write(self.name.encode() + b"\n")
                await writer.drain()
            async with asyncio.timeout(30):
                await reader.read()  # until the client (or connwatch) closes
        writer.close()


async def client(port: int) -> str:
    """One client: send a line, return the reply ("" when the connection was reset or closed)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(b"hello\n")
        async with asyncio.timeout(5):
            return (await reader.readline()).decode().strip()
    except (ConnectionError, OSError):
        return ""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _ts(line: dict[str, Any]) -> float:
    stamp = datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    return stamp.timestamp()


async def _clients_until(
    daemon: DaemonProcess, port: int, event: str, count: int = 1, limit: int = 200, **match: Any
) -> list[str]:
    """Send clients one after another until `count` `event` lines (with `match`) are logged."""
    replies: list[str] = []
    for _ in range(limit):
        if len(daemon.find(event, **match)) >= count:
            return replies
        replies.append(await client(port))
        await asyncio.sleep(0.005)  # lets the log reader keep up
    await daemon.wait_for(event, timeout=10, count=count, **match)
    return replies


async def _upstreams(daemon: DaemonProcess) -> dict[str, Any]:
    status, body = await daemon.get("/upstreams")
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)["listeners"]["app"]["upstreams"]
    return result


def _detection(**fields: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "consecutive_failures": 3,
        "early_window": "1s",
        "base_ejection_time": "500ms",
        "max_ejection_time": "10s",
        "max_ejection_percent": 50,
        **fields,
    }


DATA_PATHS = [
    "portable",
    pytest.param(
        "splice", marks=pytest.mark.skipif(not SPLICE_AVAILABLE, reason="os.splice is Linux only")
    ),
]


@pytest.mark.parametrize("data_path", DATA_PATHS)
@_RELAYED_OUTCOMES
async def test_a_resetting_target_is_ejected_and_the_next_ejection_lasts_twice_as_long(
    tmp_path: Path, data_path: str
) -> None:
    async with (
        Upstream("bad", resetting=True) as bad,
        Upstream("good", resetting=False) as good,
    ):
        listener = listener_config(
            "app",
            [bad.address, good.address],
            balance="first",
            data_path=data_path,
            outlier_detection=_detection(),
        )
        async with DaemonProcess(tmp_path, daemon_config(listener)) as daemon:
            port = daemon.port("app")
            await _clients_until(daemon, port, "upstream_ejected")
            # ejected after consecutive_failures clients reached it (a reset that beats the
            # connect's completion is a failed connect, and that client falls over to "good")
            assert len(bad.accepts) == 3
            first = daemon.find("upstream_ejected")[0]
            assert first["listener"] == "app"
            assert first["upstream"] == bad.address
            assert first["failures"] == 3
            assert first["ejection_s"] == 0.5
            await _clients_until(
                daemon, port, "upstream_state_changed", upstream=bad.address, new="UNKNOWN"
            )
            # back in: the first target takes clients again, fails 3 more, out for twice as long
            await _clients_until(daemon, port, "upstream_ejected", count=2)
            second = daemon.find("upstream_ejected")[1]
            assert second["ejection_s"] == 1.0
            await _clients_until(
                daemon,
                port,
                "upstream_state_changed",
                count=2,
                upstream=bad.address,
                new="UNKNOWN",
            )
            downs = daemon.find("upstream_state_changed", upstream=bad.address, new="DOWN")
            ups = daemon.find("upstream_state_changed", upstream=bad.address, new="UNKNOWN")
            assert [line["cause"] for line in downs + ups] == ["passive"] * 4
            for down, up, length in zip(downs, ups, (0.5, 1.0), strict=True):
                assert _ts(up) - _ts(down) >= length - 0.01
                # no client reached the ejected target while it was out
                assert not [t for t in bad.accepts if _ts(down) + 0.005 < t < _ts(up) - 0.005]
            # back from the first ejection, exactly consecutive_failures clients before the second
            assert len([t for t in bad.accepts if _ts(ups[0]) < t < _ts(downs[1])]) == 3
            metrics = await daemon.metrics()
            key = f'connwatch_upstream_ejections_total{{listener="app",upstream="{bad.address}"}}'
            assert metrics[key] == 2
            other = (
                f'connwatch_upstream_ejections_total{{listener="app",upstream="{good.address}"}}'
            )
            assert metrics[other] == 0


async def test_max_ejection_percent_keeps_the_second_failing_target_and_upstreams_says_why(
    tmp_path: Path,
) -> None:
    async with (
        Upstream("one", resetting=True) as one,
        Upstream("two", resetting=True) as two,
    ):
        listener = listener_config(
            "app",
            [one.address, two.address],
            outlier_detection=_detection(
                consecutive_failures=2, base_ejection_time="60s", max_ejection_time="300s"
            ),
        )
        async with DaemonProcess(tmp_path, daemon_config(listener)) as daemon:
            port = daemon.port("app")
            await _clients_until(daemon, port, "upstream_ejection_refused", limit=40)
            ejected = daemon.find("upstream_ejected")
            assert len(ejected) == 1
            out = ejected[0]["upstream"]
            kept = two.address if out == one.address else one.address
            refused = daemon.find("upstream_ejection_refused")[0]
            assert refused["upstream"] == kept
            assert refused["max_ejection_percent"] == 50
            upstreams = await _upstreams(daemon)
            assert upstreams[out]["status"] == "DOWN"
            assert upstreams[out]["cause"] == "passive"
            until = datetime.datetime.fromisoformat(
                upstreams[out]["ejected_until"].replace("Z", "+00:00")
            )
            assert 50 < until.timestamp() - time.time() <= 60
            assert upstreams[out]["weight"] == 0.0
            assert upstreams[out]["active"] == 0
            assert upstreams[out]["pool"] is None
            assert upstreams[kept] == {
                "status": "UNKNOWN",
                "cause": "config",
                "ejected_until": None,
                "weight": 1.0,
                "active": 0,
                "pool": None,
            }
            before = len(daemon.find("upstream_ejected"))
            for _ in range(5):  # the kept target still takes every client, and stays
                assert await client(port) == ""
            assert len(daemon.find("upstream_ejected")) == before
            metrics = await daemon.metrics()
            label = 'connwatch_upstream_ejections_total{{listener="app",upstream="{}"}}'
            assert metrics[label.format(out)] == 1
            assert metrics[label.format(kept)] == 0


async def test_upstreams_counts_active_connections(tmp_path: Path) -> None:
    async with Upstream("good", resetting=False) as good:
        listener = listener_config("app", [good.address], outlier_detection=_detection())
        async with DaemonProcess(tmp_path, daemon_config(listener)) as daemon:
            _reader, writer = await asyncio.open_connection(LOOPBACK, daemon.port("app"))
            try:

                async def one_active() -> bool:
                    return bool((await _upstreams(daemon))[good.address]["active"] == 1)

                await eventually(one_active)
            finally:
                writer.close()


async def test_workers_report_outcomes_to_the_primary_which_ejects_for_all(
    tmp_path: Path,
) -> None:
    async with (
        Upstream("bad", resetting=True) as bad,
        Upstream("good", resetting=False) as good,
    ):
        listener = listener_config(
            "app",
            [bad.address, good.address],
            balance="first",
            outlier_detection=_detection(base_ejection_time="30s", max_ejection_time="300s"),
        )
        async with DaemonProcess(tmp_path, daemon_config(listener, workers=2)) as daemon:
            port = daemon.port("app")
            await _clients_until(daemon, port, "upstream_ejected", limit=100)
            assert len(daemon.find("upstream_ejected")) == 1
            upstreams = await _upstreams(daemon)
            assert upstreams[bad.address]["status"] == "DOWN"
            assert upstreams[bad.address]["cause"] == "passive"
            assert upstreams[bad.address]["ejected_until"] is not None

            # every worker hears of the ejection: then no client reaches the target
            async def settled() -> bool:
                replies = [await client(port) for _ in range(10)]
                return replies == ["good"] * 10

            await eventually(settled, timeout=10)
            reached = len(bad.accepts)
            replies = [await client(port) for _ in range(30)]
            assert replies == ["good"] * 30
            assert len(bad.accepts) == reached
            metrics = await daemon.metrics()
            key = f'connwatch_upstream_ejections_total{{listener="app",upstream="{bad.address}"}}'
            assert metrics[key] == 1  # one decision, not one per worker


async def test_slow_start_after_an_ejection(tmp_path: Path) -> None:
    window = 3.0
    async with (
        Upstream("back", resetting=True) as back,
        Upstream("steady", resetting=False) as steady,
    ):
        listener = listener_config(
            "app",
            [back.address, steady.address],
            slow_start=f"{window}s",
            outlier_detection=_detection(consecutive_failures=2),
        )
        async with DaemonProcess(tmp_path, daemon_config(listener)) as daemon:
            port = daemon.port("app")
            await _clients_until(daemon, port, "upstream_ejected", limit=40)
            back.resetting = False  # the service recovers while ejected
            returned = await daemon.wait_for(
                "upstream_state_changed", upstream=back.address, new="UNKNOWN", timeout=10
            )
            start = _ts(returned)
            weight = (await _upstreams(daemon))[back.address]["weight"]
            assert 0.1 <= weight < 1.0
            picks: list[tuple[float, str]] = []
            deadline = time.monotonic() + 30
            while time.time() < start + window * 1.3 and time.monotonic() < deadline:
                sent = time.time()
                picks.append((sent - start, await client(port)))

            def share(low: float, high: float) -> float:
                names = [name for at, name in picks if low <= at < high]
                assert len(names) >= 10, (low, high, len(names))
                return names.count("back") / len(names)

            early, late = share(0.0, window * 0.2), share(window * 0.8, window)
            assert early < 0.3 * 0.5  # under 30% of its normal (round_robin) share
            assert late > 0.6 * 0.5
            assert early < late
            assert (await _upstreams(daemon))[back.address]["weight"] == 1.0


async def test_on_upstream_down_close_applies_to_an_ejection(tmp_path: Path) -> None:
    async with (
        Upstream("flaky", resetting=False) as flaky,
        Upstream("good", resetting=False) as good,
    ):
        listener = listener_config(
            "app",
            [flaky.address, good.address],
            balance="first",
            on_upstream_down="close",
            outlier_detection=_detection(base_ejection_time="30s", max_ejection_time="300s"),
        )
        async with DaemonProcess(tmp_path, daemon_config(listener)) as daemon:
            port = daemon.port("app")
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                writer.write(b"hello\n")
                assert await reader.readline() == b"flaky\n"  # a working connection, kept open
                flaky.resetting = True
                await _clients_until(daemon, port, "upstream_ejected", limit=40)
                async with asyncio.timeout(10):
                    assert await reader.read() == b""  # connwatch closed it
                closed = await daemon.wait_for(
                    "connection_closed", upstream=flaky.address, reason="upstream_down"
                )
                assert closed["bytes_upstream_to_client"] == len(b"flaky\n")
            finally:
                writer.close()
