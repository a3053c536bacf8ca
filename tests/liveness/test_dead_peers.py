"""Real dead peers: nftables makes one client silent on loopback; the daemon must notice in time.

Each test runs the daemon as a subprocess, opens one proxied connection, reads the client's port
from `/connections`, and drops every packet to and from that port on `lo` (tests/nft.py: a table
of our own, deleted afterwards whatever happens). Root only; skipped elsewhere.

Bounds are measured from the moment the rule lands to the moment the test sees the daemon's
`connection_closed` line, so pipe and scheduling delays count against connwatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.nft import ACK_ONLY, captured, missing_for_root_tests, read_pcap, silenced, table_exists
from tests.support import (
    LOOPBACK,
    DaemonProcess,
    EchoUpstream,
    daemon_config,
    eventually,
    listener_config,
)

_SKIP = missing_for_root_tests("nft", "tcpdump")
pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
]

KEEPALIVE_OFF = {"client": {"enabled": False}, "upstream": {"enabled": False}}
HEARTBEATS_OFF = {"enabled": False}
CHUNK = 4096
HELLO = b"hello\n"
STREAM_INTERVAL = 0.02  # a streaming upstream sends a chunk every 20 ms


@contextlib.asynccontextmanager
async def proxied_client(
    daemon: DaemonProcess, *, rcvbuf: int | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]]:
    """One connection through the daemon, greeted; yields it with its `/connections` record."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, daemon.port("app")))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(HELLO)
        assert await reader.readexactly(len(HELLO)) == HELLO
        local_port = writer.get_extra_info("sockname")[1]
        records = await daemon.connections()
        [record] = [r for r in records if r["client"] == f"{LOOPBACK}:{local_port}"]
        yield reader, writer, record
    finally:
        writer.transport.abort()


def client_port(record: dict[str, Any]) -> int:
    return int(record["client"].rsplit(":", 1)[1])


async def test_keepalive_finds_a_silent_idle_client_and_probes_are_on_the_wire(
    tmp_path: Path,
) -> None:
    idle, interval, count = 1.0, 1.0, 2
    keepalive = {"enabled": True, "idle": "1s", "interval": "1s", "count": count}
    async with EchoUpstream(greet_only=True) as upstream:
        cfg = daemon_config(
            listener_config(
                "app",
                [upstream.address],
                keepalive={"client": keepalive, "upstream": keepalive},
                heartbeat=HEARTBEATS_OFF,
            )
        )
        async with DaemonProcess(tmp_path, cfg) as daemon:
            listen_port = daemon.port("app")
            pcap = tmp_path / "keepalive.pcap"
            # Capture from before the connection opens, so the last packet before the quiet
            # spell (which keep-alive's idle time counts from) is on file.
            async with captured(listen_port, pcap), proxied_client(daemon) as (_, _, rec):
                port = client_port(rec)
                async with silenced(port) as table:
                    landed = time.monotonic()
                    closed = await daemon.wait_for(
                        "connection_closed", conn_id=rec["id"], timeout=15
                    )
                    took = time.monotonic() - landed
                    await asyncio.wait_for(upstream.ended.wait(), 5)
                assert not await table_exists(table)
    bound = idle + interval * count + 2
    print(f"keepalive_timeout after {took:.2f}s (bound {bound}s)")  # the docs' table, with -rP
    assert closed["reason"] == "keepalive_timeout", closed
    assert took <= bound, f"closed {took:.2f}s after the rule landed; bound {bound}s"

    packets = [p for p in read_pcap(pcap) if port in (p.sport, p.dport)]
    from_daemon = [p for p in packets if p.sport == listen_port]
    # A keep-alive probe is a bare ACK that repeats the last acknowledged byte (seq = snd_una-1).
    snd_una = max(p.seq + p.payload for p in from_daemon)
    probes = [p for p in from_daemon if p.flags == ACK_ONLY and p.seq == snd_una - 1]
    assert len(probes) == count, f"expected {count} probes, saw {probes}"
    # Keep-alive's idle time counts from the last packet the daemon received.
    quiet_from = max(p.time for p in packets if p.sport == port and p.time < probes[0].time)
    print("keep-alive probes at", [round(p.time - quiet_from, 3) for p in probes], "s")
    assert probes[0].time - quiet_from == pytest.approx(idle, abs=0.5)
    for earlier, later in itertools.pairwise(probes):
        assert later.time - earlier.time == pytest.approx(interval, abs=0.5)


async def test_heartbeat_closes_a_dead_client_with_data_in_flight(tmp_path: Path) -> None:
    stall_timeout, threshold, interval = 1.0, 2, 0.2
    heartbeat = {
        "enabled": True,
        "interval": "200ms",
        # Fixed, so the bound below (which counts beats of `interval`) is the one tested; the
        # adaptive case is test_idle_connection_lives_through_beats_growing_to_max_interval.
        "max_interval": "200ms",
        "failure_threshold": threshold,
        "stall_timeout": "1s",
    }
    async with EchoUpstream(greet_only=True, stream=STREAM_INTERVAL) as upstream:
        cfg = daemon_config(
            listener_config("app", [upstream.address], keepalive=KEEPALIVE_OFF, heartbeat=heartbeat)
        )
        async with (
            DaemonProcess(tmp_path, cfg) as daemon,
            proxied_client(daemon) as (
                reader,
                _,
                rec,
            ),
        ):
            await reader.readexactly(CHUNK)  # the upstream's stream reaches the client
            async with silenced(client_port(rec)):
                landed = time.monotonic()
                closed = await daemon.wait_for("connection_closed", conn_id=rec["id"], timeout=15)
                took = time.monotonic() - landed
                await asyncio.wait_for(upstream.ended.wait(), 5)
            failed = daemon.find("heartbeat_failed", conn_id=rec["id"])
    bound = stall_timeout + threshold * interval + 2
    print(f"heartbeat_failed after {took:.2f}s (bound {bound}s): {failed}")
    assert closed["reason"] == "heartbeat_failed", closed
    assert took <= bound, f"closed {took:.2f}s after the rule landed; bound {bound}s"
    [line] = failed
    assert line["listener"] == "app"
    assert line["cause"] == "stalled"
    assert line["sides"] == ["client"]
    figures = line["client_tcp"]
    assert figures["state"] == "ESTABLISHED"
    assert figures["unacked"] > 0
    assert figures["retransmits"] >= 1
    assert figures["last_ack_recv_ms"] >= stall_timeout * 1000
    assert figures["no_ack_progress_s"] >= stall_timeout


async def test_a_client_that_stops_reading_is_zero_window_and_stays_open(tmp_path: Path) -> None:
    heartbeat = {
        "enabled": True,
        "interval": "200ms",
        "max_interval": "1s",
        "failure_threshold": 2,
        "stall_timeout": "1s",
    }
    async with EchoUpstream(greet_only=True, stream=STREAM_INTERVAL) as upstream:
        cfg = daemon_config(
            listener_config("app", [upstream.address], keepalive=KEEPALIVE_OFF, heartbeat=heartbeat)
        )
        async with (
            DaemonProcess(tmp_path, cfg) as daemon,
            proxied_client(daemon, rcvbuf=4096) as (_, _, rec),
        ):
            # The client reads nothing from here on; its window closes, the daemon probes it.
            await daemon.wait_for("liveness_changed", conn_id=rec["id"], new="zero_window")
            ok = 'connwatch_heartbeats_total{listener="app",result="ok"}'
            start = (await daemon.metrics())[ok]

            async def beats_passed() -> bool:
                return (await daemon.metrics())[ok] >= start + 8

            # Eight more beats: several seconds, well past stall_timeout and the threshold.
            await eventually(beats_passed, timeout=20, interval=0.2)
            [now] = [r for r in await daemon.connections() if r["id"] == rec["id"]]
            assert now["liveness"] == "zero_window", now
            assert now["heartbeat"]["failures"] == 0
            assert now["tcp"]["client"]["unacked"] == 0  # window probes carry no new data
            assert not daemon.find("connection_closed", conn_id=rec["id"])
            assert not daemon.find("heartbeat_failed")
            m = await daemon.metrics()
            assert m['connwatch_connections_liveness{listener="app",state="zero_window"}'] == 1
            assert m['connwatch_heartbeats_total{listener="app",result="failed"}'] == 0


async def test_idle_connection_lives_through_beats_growing_to_max_interval(
    tmp_path: Path,
) -> None:
    heartbeat = {
        "enabled": True,
        "interval": "200ms",
        "max_interval": "1s",
        "failure_threshold": 2,
        "stall_timeout": "1s",
    }
    async with EchoUpstream(greet_only=True) as upstream:
        cfg = daemon_config(listener_config("app", [upstream.address], heartbeat=heartbeat))
        async with DaemonProcess(tmp_path, cfg) as daemon, proxied_client(daemon) as (_, _, rec):
            assert rec["heartbeat"]["interval_s"] in (0.2, 0.3)  # at most one beat so far
            await daemon.wait_for("liveness_changed", conn_id=rec["id"], new="idle", timeout=10)
            seen: set[float] = set()

            async def at_max_interval() -> bool:
                [now] = [r for r in await daemon.connections() if r["id"] == rec["id"]]
                seen.add(now["heartbeat"]["interval_s"])
                return bool(now["heartbeat"]["interval_s"] == 1.0)

            await eventually(at_max_interval, timeout=15, interval=0.05)
            ok = 'connwatch_heartbeats_total{listener="app",result="ok"}'
            start = (await daemon.metrics())[ok]

            async def beats_passed() -> bool:
                return (await daemon.metrics())[ok] >= start + 3

            await eventually(beats_passed, timeout=10, interval=0.2)
            [now] = [r for r in await daemon.connections() if r["id"] == rec["id"]]
            assert now["liveness"] == "idle"
            assert now["heartbeat"] == {"state": "ok", "failures": 0, "interval_s": 1.0}
            assert not daemon.find("connection_closed", conn_id=rec["id"])
    # The interval grew by x1.5 per beat on its way up (0.3, 0.45, 0.675 show between 0.2 and 1).
    assert {0.3, 0.45, 0.675} & seen, seen


# -- more settings, for the detection-time table in docs/liveness.md ------------------------------
async def test_user_timeout_finds_a_dead_client_with_data_in_flight(tmp_path: Path) -> None:
    """TCP_USER_TIMEOUT (keep-alive probes off) ends the leg with ETIMEDOUT: keepalive_timeout."""
    user_timeout = 2.0
    keepalive = {
        "client": {"enabled": False, "user_timeout": "2s"},
        "upstream": {"enabled": False},
    }
    async with EchoUpstream(greet_only=True, stream=STREAM_INTERVAL) as upstream:
        cfg = daemon_config(
            listener_config(
                "app", [upstream.address], keepalive=keepalive, heartbeat=HEARTBEATS_OFF
            )
        )
        async with (
            DaemonProcess(tmp_path, cfg) as daemon,
            proxied_client(daemon) as (reader, _, rec),
        ):
            await reader.readexactly(CHUNK)
            async with silenced(client_port(rec)):
                landed = time.monotonic()
                closed = await daemon.wait_for("connection_closed", conn_id=rec["id"], timeout=15)
                took = time.monotonic() - landed
                await asyncio.wait_for(upstream.ended.wait(), 5)
    bound = user_timeout + 2
    print(f"keepalive_timeout (user_timeout) after {took:.2f}s (bound {bound}s)")
    assert closed["reason"] == "keepalive_timeout", closed
    assert took <= bound


async def test_adaptive_heartbeat_at_max_interval_finds_a_dead_client(tmp_path: Path) -> None:
    """The interval has grown to max_interval before the peer dies: detection may take up to one
    max_interval longer, and no more (the stall re-check does not wait for a full interval)."""
    stall_timeout, threshold, interval, max_interval = 1.0, 3, 0.5, 2.0
    heartbeat = {
        "enabled": True,
        "interval": "500ms",
        "max_interval": "2s",
        "failure_threshold": threshold,
        "stall_timeout": "1s",
    }
    async with EchoUpstream(greet_only=True, stream=STREAM_INTERVAL) as upstream:
        cfg = daemon_config(
            listener_config("app", [upstream.address], keepalive=KEEPALIVE_OFF, heartbeat=heartbeat)
        )
        async with (
            DaemonProcess(tmp_path, cfg) as daemon,
            proxied_client(daemon) as (reader, _, rec),
        ):
            drain = asyncio.create_task(_drain(reader))
            try:

                async def at_max_interval() -> bool:
                    [now] = [r for r in await daemon.connections() if r["id"] == rec["id"]]
                    return bool(now["heartbeat"]["interval_s"] == max_interval)

                await eventually(at_max_interval, timeout=20, interval=0.1)
                async with silenced(client_port(rec)):
                    landed = time.monotonic()
                    closed = await daemon.wait_for(
                        "connection_closed", conn_id=rec["id"], timeout=20
                    )
                    took = time.monotonic() - landed
            finally:
                drain.cancel()
    bound = stall_timeout + max_interval + threshold * interval + 2
    print(f"heartbeat_failed (adaptive, at max_interval) after {took:.2f}s (bound {bound}s)")
    assert closed["reason"] == "heartbeat_failed", closed
    assert took <= bound


async def _drain(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(OSError):
        while await reader.read(65536):
            pass


async def test_dead_upstream_behind_paused_reading_closes_as_keepalive_timeout(
    tmp_path: Path,
) -> None:
    """The client reads nothing, so the daemon has paused reading the upstream leg and the loop
    no longer polls it: the kernel's keep-alive ETIMEDOUT there reaches no callback. The
    watchdog sees the socket CLOSE, and the close names the kernel's reason."""
    keepalive = {
        "client": {"enabled": False},
        "upstream": {"enabled": True, "idle": "1s", "interval": "1s", "count": 2},
    }
    heartbeat: dict[str, Any] = {
        "enabled": True,
        "interval": "500ms",
        "max_interval": "500ms",
        "failure_threshold": 2,
    }
    async with EchoUpstream(greet_only=True, stream=0) as upstream:
        cfg = daemon_config(
            listener_config("app", [upstream.address], keepalive=keepalive, heartbeat=heartbeat)
        )
        async with (
            DaemonProcess(tmp_path, cfg) as daemon,
            proxied_client(daemon, rcvbuf=4096) as (_, _, rec),
        ):
            await daemon.wait_for("liveness_changed", conn_id=rec["id"], new="zero_window")
            await asyncio.wait_for(upstream.blocked.wait(), 10)
            paused = 'connwatch_flow_paused_total{direction="upstream_to_client",listener="app"}'

            async def reading_paused() -> bool:
                return (await daemon.metrics()).get(paused, 0) >= 1

            await eventually(reading_paused, timeout=10)
            async with silenced(upstream.port):
                landed = time.monotonic()
                closed = await daemon.wait_for("connection_closed", conn_id=rec["id"], timeout=15)
                took = time.monotonic() - landed
            [failed] = daemon.find("heartbeat_failed", conn_id=rec["id"])
    bound = 1 + 1 * 2 + 2 * 0.5 + 2
    print(f"keepalive_timeout (paused leg, via the watchdog) after {took:.2f}s (bound {bound}s)")
    assert closed["reason"] == "keepalive_timeout", closed
    assert failed["socket_errors"] == {"upstream": "ETIMEDOUT"}
    assert failed["upstream_tcp"]["state"] == "CLOSE"
    assert took <= bound
