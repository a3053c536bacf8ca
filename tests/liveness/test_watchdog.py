"""The liveness watchdog on real loopback connections: classification, adaptive interval, closing
dead legs, and what /connections and /metrics show.

Most tests drive beats by hand (`Watchdog.beat`) on a listener whose own schedule is too slow to
interfere, with a clock the test moves forward; the scheduler and the daemon wiring are tested
with real time at short intervals.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from connwatch._types import CloseReason, ConnectionState, Liveness
from connwatch.config import ListenerConfig, load_settings
from connwatch.liveness.tcp_info import read_tcp_info
from connwatch.liveness.watch_records import WatchRecord
from connwatch.liveness.watchdog import Watchdog
from connwatch.observe.tracker import Tracker
from connwatch.proxy.connection import MonitoredConnection
from connwatch.proxy.listener import Listener
from tests.support import (
    LOOPBACK,
    EchoUpstream,
    daemon_config,
    eventually,
    http_request,
    listener_config,
    parse_metrics,
    running_daemon,
)

pytestmark = pytest.mark.both_loops

CHUNK = 16 * 1024
TCP_CLOSE = 7  # include/net/tcp_states.h
SLOW = {"enabled": True, "interval": "1s", "max_interval": "4s", "stall_timeout": "5s"}


class FakeClock:
    """time.monotonic() plus an offset the test moves forward (the connections' own timestamps
    stay on the real clock, so moving forward makes them look older)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def held_upstream(*, stream: bool = False, unix_path: Path | None = None) -> EchoUpstream:
    """Echoes the first chunk, then (if asked) streams until told to stop; never closes first."""
    return EchoUpstream(
        greet_only=True,
        stream=0 if stream else None,
        chunks=10_000,  # bounded
        hold_open=True,
        unix_path=unix_path,
    )


def _listener_config(upstream: str, heartbeat: dict[str, Any], **extra: Any) -> ListenerConfig:
    cfg = daemon_config(listener_config("wd", [upstream], heartbeat=heartbeat, **extra))
    return load_settings(None, base=cfg, env={}).listeners[0]


@contextlib.asynccontextmanager
async def watched(
    upstream: str, heartbeat: dict[str, Any], clock: FakeClock | None = None, **extra: Any
) -> AsyncIterator[tuple[Watchdog, Listener, Tracker]]:
    """A real listener proxying to `upstream`, watched by a Watchdog on `clock`."""
    watchdog = Watchdog(clock=clock or FakeClock())
    tracker = Tracker(log_events=False)
    config = _listener_config(upstream, heartbeat, **extra)
    listener = Listener(config, tracker, liveness=watchdog)
    await listener.start()
    watchdog.configure(listener.name, config)
    try:
        yield watchdog, listener, tracker
    finally:
        listener.stop_accepting()
        for conn in list(tracker.connections()):
            conn.close(CloseReason.SHUTDOWN, abort=True)
        watchdog.close()


@contextlib.asynccontextmanager
async def client(
    listener: Listener, tracker: Tracker, *, rcvbuf: int | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, MonitoredConnection]]:
    """A greeted client connection and the daemon's MonitoredConnection for it."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, listener.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
    try:
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        me = f"{LOOPBACK}:{writer.get_extra_info('sockname')[1]}"
        [conn] = [c for c in tracker.connections() if c.client == me]
        yield reader, writer, conn
    finally:
        writer.transport.abort()


class Proxied:
    """One watched, greeted connection through a real listener."""

    def __init__(
        self,
        wd: Watchdog,
        up: EchoUpstream,
        writer: asyncio.StreamWriter,
        conn: MonitoredConnection,
    ) -> None:
        self.wd = wd
        self.up = up
        self.writer = writer
        self.conn = conn


@contextlib.asynccontextmanager
async def proxied(
    heartbeat: dict[str, Any],
    clock: FakeClock | None = None,
    *,
    stream: bool = False,
    rcvbuf: int | None = None,
    data_path: str = "portable",
) -> AsyncIterator[Proxied]:
    async with (
        held_upstream(stream=stream) as up,
        watched(up.address, heartbeat, clock, data_path=data_path) as (wd, listener, tracker),
        client(listener, tracker, rcvbuf=rcvbuf) as (_, writer, conn),
    ):
        yield Proxied(wd, up, writer, conn)


def interval_of(watchdog: Watchdog, conn: MonitoredConnection) -> float:
    return float(watchdog.describe(conn)["heartbeat"]["interval_s"])


# -- classification -------------------------------------------------------------------------------
DATA_PATHS = pytest.mark.parametrize("data_path", ["portable", "splice"])


@DATA_PATHS
async def test_fresh_connection_is_ok_with_tcp_figures_from_both_legs(data_path: str) -> None:
    async with proxied(SLOW, data_path=data_path) as p:
        assert p.wd.beat(p.conn) is Liveness.OK
        described = p.wd.describe(p.conn)
        assert described["liveness"] == "ok"
        assert described["heartbeat"] == {"state": "ok", "failures": 0, "interval_s": 1.5}
        for side in ("client", "upstream"):
            figures = described["tcp"][side]
            assert figures["unacked"] == 0
            assert figures["retransmits"] == 0
            assert 0 < figures["rtt_ms"] < 100  # loopback
        stats = p.wd.statistics()["wd"]
        assert stats.heartbeats == {"ok": 1, "failed": 0}
        assert stats.states["ok"] == 1
        assert all(stats.rtt[side].count == 1 for side in ("client", "upstream"))


async def test_quiet_for_longer_than_max_interval_is_idle() -> None:
    clock = FakeClock()
    async with proxied(SLOW, clock) as p:
        assert p.wd.beat(p.conn) is Liveness.OK
        clock.advance(4.01)  # max_interval is 4s
        assert p.wd.beat(p.conn) is Liveness.IDLE
        stats = p.wd.statistics()["wd"]
        assert (stats.states["ok"], stats.states["idle"]) == (0, 1)


async def test_one_direction_ended_is_half_closed() -> None:
    async with proxied(SLOW) as p:
        p.writer.write_eof()
        await eventually(lambda: p.conn.half_closed)
        assert p.wd.beat(p.conn) is Liveness.HALF_CLOSED
        assert p.wd.describe(p.conn)["liveness"] == "half_closed"


@DATA_PATHS
async def test_a_client_that_stops_reading_is_zero_window_not_dead(data_path: str) -> None:
    clock = FakeClock()
    async with proxied(SLOW, clock, stream=True, rcvbuf=4096, data_path=data_path) as p:
        await asyncio.wait_for(p.up.blocked.wait(), 10)
        await eventually(lambda: p.wd.beat(p.conn) is Liveness.ZERO_WINDOW, timeout=10)
        # Far past stall_timeout: the client still answers window probes, so it is alive.
        for _ in range(5):
            clock.advance(6)
            assert p.wd.beat(p.conn) is Liveness.ZERO_WINDOW
        described = p.wd.describe(p.conn)
        assert described["heartbeat"]["failures"] == 0
        assert described["tcp"]["client"]["unacked"] == 0
        assert p.conn.state is ConnectionState.OPEN
        assert p.wd.statistics()["wd"].states["zero_window"] == 1


@DATA_PATHS
async def test_a_leg_reset_while_reading_is_paused_fails_beats_then_closes_both(
    data_path: str,
) -> None:
    """With reading paused the loop does not poll the upstream socket, so a RST from the upstream
    goes unnoticed by the transport; the kernel shows the socket CLOSE, and beats fail on it.
    The close names the kernel's reason (SO_ERROR ECONNRESET), not the watchdog's."""
    heartbeat = {**SLOW, "failure_threshold": 2}
    async with proxied(heartbeat, stream=True, rcvbuf=4096, data_path=data_path) as p:
        await asyncio.wait_for(p.up.blocked.wait(), 10)
        await eventually(lambda: p.wd.beat(p.conn) is Liveness.ZERO_WINDOW, timeout=10)
        p.up.reset_all()
        # The RST lands at once on loopback; the transport, not polling, never hears of it.
        await eventually(lambda: read_tcp_info(p.conn.upstream_socket).state == TCP_CLOSE)
        assert p.wd.beat(p.conn) is Liveness.FAILING
        assert p.wd.describe(p.conn)["heartbeat"] == {
            "state": "failing",
            "failures": 1,
            "interval_s": 1.0,
        }
        assert p.conn.state is ConnectionState.OPEN
        p.wd.beat(p.conn)  # the second failed beat reaches failure_threshold
        await eventually(lambda: p.conn.state is ConnectionState.CLOSED)
        assert p.conn.reason is CloseReason.UPSTREAM_RESET
        stats = p.wd.statistics()["wd"]
        assert stats.heartbeats["failed"] == 2
        assert sum(stats.states.values()) == 0  # unwatched on close


async def test_a_cleanly_finished_leg_with_a_reply_still_queued_is_not_a_failure() -> None:
    """The upstream answered and sent its FIN while the client reads nothing: FINs went both ways,
    so the kernel shows the upstream socket CLOSE (time-wait hand-off) with the reply queued
    behind paused reading. No error is pending: a clean end, not a dead socket."""
    sent = 0
    tracker = Tracker(log_events=False)
    handlers: list[asyncio.StreamWriter] = []
    finished = asyncio.Event()

    def reading_paused() -> bool:
        return bool(tracker.statistics()["wd"].flow_paused.get("upstream_to_client"))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        handlers.append(writer)
        [proxying] = list(tracker.connections())

        def caught_up() -> bool:  # the daemon read all we sent, or stopped reading us
            return reading_paused() or proxying.bytes_upstream_to_client >= sent

        with contextlib.suppress(OSError):
            assert await reader.read() == b"question"  # up to the client's EOF
            for _ in range(4096):  # bounded: until the daemon stops reading us, then once more
                writer.write(b"r" * CHUNK)
                sent += CHUNK
                if reading_paused():
                    break
                await writer.drain()
                await eventually(caught_up, interval=0.001)  # the daemon shares this loop
            sock = writer.get_extra_info("socket")

            def all_taken() -> bool:  # in the daemon's kernel, so our FIN goes right out
                info = read_tcp_info(sock)
                return info is not None and info.unacked == 0 == info.notsent_bytes

            await eventually(all_taken)
            writer.write_eof()
            finished.set()
            await reader.read()
        writer.close()
        handlers.remove(writer)

    server = await asyncio.start_server(answer, LOOPBACK, 0)
    address = f"{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
    wd = Watchdog(clock=FakeClock())
    config = _listener_config(address, {**SLOW, "failure_threshold": 1}, buffer_size="64KiB")
    listener = Listener(config, tracker, liveness=wd)
    await listener.start()
    wd.configure(listener.name, config)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, listener.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
    try:
        await eventually(
            lambda: [c for c in tracker.connections() if c.state is ConnectionState.OPEN]
        )
        [conn] = list(tracker.connections())
        # Small buffers toward the client, a fixed roomy window from the upstream: reading pauses
        # early, and what the upstream sends after that (and its FIN) fits into the window.
        conn.client_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conn.upstream_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        writer.write(b"question")
        writer.write_eof()
        await asyncio.wait_for(finished.wait(), 15)
        await eventually(lambda: read_tcp_info(conn.upstream_socket).state == TCP_CLOSE)
        assert wd.beat(conn) is Liveness.HALF_CLOSED  # threshold 1: a failure would close it
        assert conn.state is ConnectionState.HALF_CLOSED
        got = await asyncio.wait_for(reader.read(), 10)  # now the client reads it all
        assert len(got) == sent
        await eventually(lambda: conn.state is ConnectionState.CLOSED)
        assert conn.reason is CloseReason.CLIENT_CLOSED
    finally:
        writer.close()
        listener.stop_accepting()
        for conn in list(tracker.connections()):
            conn.close(CloseReason.SHUTDOWN, abort=True)
        wd.close()
        server.close()
        for handler in handlers:
            handler.transport.abort()
        await eventually(lambda: not handlers)


# -- adaptive interval -----------------------------------------------------------------------------
async def test_interval_grows_by_half_per_passing_beat_and_resets_on_a_state_change() -> None:
    clock = FakeClock()
    async with proxied(SLOW, clock) as p:
        assert interval_of(p.wd, p.conn) == 1.0
        seen = []
        for _ in range(5):
            p.wd.beat(p.conn)
            seen.append(interval_of(p.wd, p.conn))
        assert seen == [1.5, 2.25, 3.375, 4.0, 4.0]
        clock.advance(4.5)
        assert p.wd.beat(p.conn) is Liveness.IDLE
        assert interval_of(p.wd, p.conn) == 1.0  # ok -> idle is a change of state
        p.wd.beat(p.conn)
        assert interval_of(p.wd, p.conn) == 1.5


async def test_interval_stays_fixed_when_max_interval_equals_interval() -> None:
    async with proxied({**SLOW, "max_interval": "1s"}) as p:
        for _ in range(3):
            p.wd.beat(p.conn)
            assert interval_of(p.wd, p.conn) == 1.0


# -- scheduling and configuration ----------------------------------------------------------------
async def test_scheduler_beats_every_open_connection_and_none_once_they_close() -> None:
    heartbeat = {"enabled": True, "interval": "50ms", "max_interval": "50ms"}
    async with held_upstream() as up, watched(up.address, heartbeat) as (wd, listener, tracker):
        conns = []
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(2):
                conns.append((await stack.enter_async_context(client(listener, tracker)))[2])
            await eventually(lambda: wd.statistics()["wd"].heartbeats["ok"] >= 10, timeout=5)
        up.closing.set()  # the upstream ends its side too
        await eventually(lambda: all(c.state is ConnectionState.CLOSED for c in conns))
        settled = wd.statistics()["wd"].heartbeats["ok"]
        await asyncio.sleep(0.2)  # four intervals with nothing watched: no beat may run
        assert wd.statistics()["wd"].heartbeats["ok"] == settled
        assert sum(wd.statistics()["wd"].states.values()) == 0


async def test_heartbeats_off_still_describes_from_the_kernel_and_bytes() -> None:
    clock = FakeClock()
    async with proxied({"enabled": False, "interval": "1s", "max_interval": "2s"}, clock) as p:
        described = p.wd.describe(p.conn)
        assert described["liveness"] == "ok"
        assert described["heartbeat"] == {"state": "ok", "failures": 0, "interval_s": None}
        assert described["tcp"]["client"]["unacked"] == 0
        clock.advance(3)
        assert p.wd.describe(p.conn)["liveness"] == "idle"
        stats = p.wd.statistics()["wd"]
        assert stats.heartbeats == {"ok": 0, "failed": 0}
        assert stats.states["idle"] == 1


async def test_a_connection_waiting_for_its_record_counts_as_ok_until_closed() -> None:
    heartbeat = {**SLOW, "interval": "30s", "max_interval": "60s"}  # no promotion in this test
    async with (
        held_upstream() as up,
        watched(up.address, heartbeat) as (wd, listener, tracker),
        client(listener, tracker) as (_, _, first),
        client(listener, tracker) as (_, _, second),
    ):
        assert isinstance(first.watch, float)  # watched, no record yet
        assert wd.statistics()["wd"].states["ok"] == 2
        for conn, left in ((first, 1), (second, 0)):
            conn.close(CloseReason.ADMIN_CLOSED, abort=True)
            await eventually(lambda n=left: len(tracker) == n)
            assert sum(wd.statistics()["wd"].states.values()) == left
        wd.describe(first)  # a closed one is not given a record
        assert sum(wd.statistics()["wd"].states.values()) == 0


async def test_heartbeats_off_makes_no_record_and_counts_until_closed() -> None:
    """With heartbeats off nothing is beaten, so no per-connection record (nor its two borrowed
    sockets) is made: the connection is counted by its byte counts, and not once it closes."""
    off = {"enabled": False, "interval": "1s", "max_interval": "2s"}
    async with held_upstream() as up, watched(up.address, off) as (wd, listener, tracker):
        async with client(listener, tracker) as (_, _, conn):
            assert conn.watch is not None  # watched
            assert not isinstance(conn.watch, WatchRecord)
            assert wd.beat(conn) is None
            assert wd.statistics()["wd"].states["ok"] == 1
            conn.close(CloseReason.ADMIN_CLOSED, abort=True)
            await eventually(lambda: len(tracker) == 0)
        assert conn.watch is None
        assert sum(wd.statistics()["wd"].states.values()) == 0


async def test_a_reload_applies_to_new_connections_only() -> None:
    async with (
        held_upstream() as up,
        watched(up.address, SLOW) as (wd, listener, tracker),
        client(listener, tracker) as (_, _, old),
    ):
        slower = _listener_config(up.address, {**SLOW, "interval": "2s"})
        listener.reconfigure(slower)
        wd.configure(listener.name, slower)
        async with client(listener, tracker) as (_, _, new):
            assert interval_of(wd, old) == 1.0
            assert interval_of(wd, new) == 2.0
            wd.configure(listener.name, _listener_config(up.address, {"enabled": False}))
            wd.beat(old)  # still beating on the config it was opened with
            assert wd.statistics()["wd"].heartbeats["ok"] == 1


async def test_unix_socket_legs_have_no_tcp_figures(tmp_path: Path) -> None:
    listen = tmp_path / "in.sock"
    async with (
        held_upstream(unix_path=tmp_path / "up.sock") as up,
        watched(up.address, SLOW, listen=f"unix:{listen}") as (wd, _, tracker),
    ):
        reader, writer = await asyncio.open_unix_connection(str(listen))
        try:
            writer.write(b"hi")
            assert await reader.readexactly(2) == b"hi"
            [conn] = list(tracker.connections())
            assert wd.beat(conn) is Liveness.OK
            assert wd.describe(conn)["tcp"] is None
            assert wd.statistics()["wd"].rtt["client"].count == 0
        finally:
            writer.close()


async def test_a_connection_accepted_before_configure_starts_beating_once_configured() -> None:
    async with held_upstream() as up:
        wd = Watchdog(clock=FakeClock())
        tracker = Tracker(log_events=False)
        config = _listener_config(up.address, SLOW)
        listener = Listener(config, tracker, liveness=wd)
        await listener.start()
        try:
            async with client(listener, tracker) as (_, _, conn):
                assert wd.describe(conn)["heartbeat"]["interval_s"] is None  # not yet configured
                wd.configure(listener.name, config)
                assert wd.beat(conn) is Liveness.OK
                assert interval_of(wd, conn) == 1.5
        finally:
            listener.stop_accepting()
            wd.close()


# -- through the daemon: /connections and /metrics --------------------------------------------------
async def test_connections_and_metrics_show_liveness_and_rtt() -> None:
    heartbeat = {"enabled": True, "interval": "50ms", "max_interval": "200ms"}
    async with held_upstream() as up:
        cfg = daemon_config(listener_config("app", [up.address], heartbeat=heartbeat))
        async with running_daemon(cfg) as daemon:
            admin = daemon.admin.port

            async def scrape() -> dict[str, float]:
                status, body = await http_request("GET", admin, "/metrics")
                assert status == 200
                return parse_metrics(body.decode())

            async def records() -> list[dict[str, Any]]:
                status, body = await http_request("GET", admin, "/connections")
                assert status == 200
                result: list[dict[str, Any]] = json.loads(body)
                return result

            gauge = 'connwatch_connections_liveness{{listener="app",state="{}"}}'
            rtt_count = 'connwatch_tcp_rtt_seconds_count{{listener="app",side="{}"}}'
            port = daemon.listeners["app"].port
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                writer.write(b"hello")
                await reader.readexactly(5)
                [rec] = await records()
                assert rec["liveness"] in ("ok", "idle")
                assert set(rec["heartbeat"]) == {"state", "failures", "interval_s"}
                assert set(rec["tcp"]["client"]) == {"rtt_ms", "retransmits", "unacked"}
                assert rec["tcp"]["upstream"]["unacked"] == 0

                m1 = await scrape()
                assert m1[gauge.format("ok")] + m1[gauge.format("idle")] == 1
                # Quiet for longer than max_interval: the gauge moves from ok to idle.
                await eventually(lambda: _value(scrape, gauge.format("idle"), 1), timeout=5)
                m2 = await scrape()
                assert m2[gauge.format("ok")] == 0
                assert m2[rtt_count.format("client")] > m1[rtt_count.format("client")]
                assert m2[rtt_count.format("upstream")] > 0
                assert m2['connwatch_heartbeats_total{listener="app",result="ok"}'] > 0
                [rec] = await records()
                assert rec["liveness"] == "idle"
            finally:
                writer.close()
            await eventually(lambda: _value(scrape, gauge.format("idle"), 0), timeout=5)


async def _value(scrape: Any, key: str, want: float) -> bool:
    return bool((await scrape())[key] == want)


def test_watchdog_satisfies_the_liveness_watch_protocol() -> None:
    from connwatch._types import LivenessWatch

    watchdog: LivenessWatch[MonitoredConnection] = Watchdog()
    assert watchdog.statistics() == {}


async def test_a_closed_connection_is_freed_at_once_not_by_the_collector() -> None:
    """A connection that closes before its first beat is let go of by the next one watched, and
    its legs hold no reference cycle: reference counting frees it (no wait for the promotion
    timer, an interval later, nor for a garbage collector pass)."""
    if not isinstance(asyncio.get_running_loop(), uvloop.Loop):
        pytest.skip("asyncio's own transports are in a cycle of their own (their read callback)")
    heartbeat = {**SLOW, "interval": "30s", "max_interval": "60s"}  # no promotion in this test
    async with held_upstream() as up, watched(up.address, heartbeat) as (_, listener, tracker):
        gc.disable()
        try:
            async with client(listener, tracker) as (_, _, conn):
                # (A connection has no weak references; its client leg's transport lives as long
                # as the connection does, and has them.)
                first = weakref.ref(conn.client_leg.transport)
                conn.close(CloseReason.ADMIN_CLOSED)  # (the upstream would hold it half-open)
                del conn
            await eventually(lambda: len(tracker) == 0)
            async with client(listener, tracker):
                await eventually(lambda: first() is None, timeout=5)
        finally:
            gc.enable()
