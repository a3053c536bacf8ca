"""Per-client limits (SPEC section 12) end to end through the daemon subprocess: max_connections
and connection_rate per client key, prefix grouping, the PROXY header's address as the key,
reload, and `workers: 2` (limits per worker, /clients merged).

Clients bind distinct loopback sources (127.x.y.z) to be distinct clients. A connection that is
admitted echoes; one over a limit is reset at once without a byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
from pathlib import Path
from typing import Any

from connwatch.wire.proxy_protocol import encode_v1
from tests.support import (
    LOOPBACK,
    DaemonProcess,
    EchoUpstream,
    daemon_config,
    eventually,
    free_port,
    listener_config,
)
from tests.variant import skip_under

_LIMITS_PER_WORKER = skip_under(
    "workers2",
    "client limits hold per worker (docs/spec-notes.md) and the kernel spreads one client's "
    "connections over both; test_two_workers_merge_clients_and_limit_per_worker covers workers",
)


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
REJECTED = 'connwatch_client_limit_rejections_total{{limit="{}",listener="app"}}'


async def open_from(port: int, source: str, preface: bytes = b"") -> tuple[Conn, bool]:
    """Connect from `source`; (the streams, whether the proxy admitted and echoes)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port, local_addr=(source, 0))
    writer.write(preface + b"x")
    try:
        admitted = await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
    except (asyncio.IncompleteReadError, ConnectionError):
        admitted = False
    return (reader, writer), admitted


async def close_all(conns: list[Conn]) -> None:
    for _, writer in conns:
        writer.close()
    for _, writer in conns:
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def clients(daemon: DaemonProcess, query: str = "") -> list[dict[str, Any]]:
    status, body = await daemon.get("/clients" + query)
    assert status == 200, body
    result: list[dict[str, Any]] = json.loads(body)
    return result


async def by_client(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    return {r["client"]: r for r in await clients(daemon)}


@_LIMITS_PER_WORKER
async def test_max_connections_closes_the_fourth_from_one_address_only(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(
            listener_config("app", [up.address], client_limits={"max_connections": 3})
        )
        async with DaemonProcess(tmp_path, cfg) as daemon:
            port = daemon.port("app")
            held = []
            for _ in range(3):
                conn, admitted = await open_from(port, "127.0.2.1")
                assert admitted
                held.append(conn)
            fourth, admitted = await open_from(port, "127.0.2.1")
            assert not admitted, "the 4th concurrent connection of one address is closed"
            closed = await daemon.wait_for("connection_closed", reason="client_limit")
            assert closed["client"].startswith("127.0.2.1:")
            others = []
            for _ in range(3):  # another address is not affected
                conn, admitted = await open_from(port, "127.0.2.2")
                assert admitted
                others.append(conn)
            m = await daemon.metrics()
            assert m[REJECTED.format("max_connections")] == 1
            assert m[REJECTED.format("connection_rate")] == 0
            assert (
                m['connwatch_connections_closed_total{listener="app",reason="client_limit"}'] == 1
            )
            assert m['connwatch_listener_limit{limit="client_max_connections",listener="app"}'] == 3
            view = await by_client(daemon)
            assert view["127.0.2.1"]["active"] == 3
            assert view["127.0.2.1"]["accepted"] == 4
            assert view["127.0.2.1"]["rejected"] == {"max_connections": 1, "connection_rate": 0}
            assert view["127.0.2.2"]["active"] == 3
            # After one closes, a new one is admitted.
            await close_all(held[:1])
            await eventually(lambda: _active(daemon, "127.0.2.1", 2))
            again, admitted = await open_from(port, "127.0.2.1")
            assert admitted
            await close_all([*held[1:], fourth, *others, again])


async def _active(daemon: DaemonProcess, client: str, want: int) -> bool:
    view = await by_client(daemon)
    return client in view and view[client]["active"] == want


def _ts(line: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()


@_LIMITS_PER_WORKER
async def test_connection_rate_admits_the_burst_and_the_rate(tmp_path: Path) -> None:
    """100 attempts over about a second at rate 20: the burst (20) plus 20 per second of the
    span the daemon saw (±3); a second client at the same time is unaffected."""
    async with EchoUpstream() as up:
        cfg = daemon_config(
            listener_config("app", [up.address], client_limits={"connection_rate": 20})
        )
        async with DaemonProcess(tmp_path, cfg) as daemon:
            port = daemon.port("app")
            admitted = 0
            other_admitted = 0
            conns: list[Conn] = []
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(100):
                await asyncio.sleep(max(0.0, start + i * 0.01 - loop.time()))
                conn, ok = await open_from(port, "127.0.3.1")
                admitted += ok
                conns.append(conn)
                if i % 10 == 0:  # a second client, 10 connections in the same second
                    conn, ok = await open_from(port, "127.0.3.2")
                    other_admitted += ok
                    conns.append(conn)
            await close_all(conns)
            assert other_admitted == 10
            m = await daemon.metrics()
            rejected = m[REJECTED.format("connection_rate")]
            assert admitted + rejected == 100
            # The daemon's own clock: first and last connection it saw from 127.0.3.1.
            seen = [
                _ts(line)
                for line in daemon.lines
                if line.get("event") in ("connection_opened", "connection_closed")
                and str(line.get("client", "")).startswith("127.0.3.1:")
                and (line["event"] == "connection_opened" or line.get("reason") == "client_limit")
            ]
            span = max(seen) - min(seen)
            assert 0.5 < span < 3
            expected = 20 + 20 * span
            assert expected - 3 <= admitted <= expected + 3, (admitted, span)
            view = await by_client(daemon)
            assert view["127.0.3.1"]["accepted"] == 100
            assert view["127.0.3.1"]["rejected"]["connection_rate"] == rejected
            assert view["127.0.3.2"]["rejected"]["connection_rate"] == 0


@_LIMITS_PER_WORKER
async def test_ipv4_prefix_groups_a_network_as_one_client(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        limits = {"max_connections": 2, "ipv4_prefix": 24}
        cfg = daemon_config(listener_config("app", [up.address], client_limits=limits))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            port = daemon.port("app")
            a, ok_a = await open_from(port, "127.0.1.5")
            b, ok_b = await open_from(port, "127.0.1.9")
            c, ok_c = await open_from(port, "127.0.1.200")
            d, ok_d = await open_from(port, "127.0.2.5")  # another /24
            assert (ok_a, ok_b, ok_c, ok_d) == (True, True, False, True)
            view = await by_client(daemon)
            assert view["127.0.1.0/24"]["accepted"] == 3
            assert view["127.0.1.0/24"]["active"] == 2
            assert view["127.0.2.0/24"]["accepted"] == 1
            assert "127.0.1.5" not in view
            await close_all([a, b, c, d])


@_LIMITS_PER_WORKER
async def test_proxy_protocol_header_address_is_the_client_key(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(
            listener_config(
                "app",
                [up.address],
                proxy_protocol={"accept": True},
                client_limits={"max_connections": 1},
            )
        )
        async with DaemonProcess(tmp_path, cfg) as daemon:
            port = daemon.port("app")
            first = encode_v1(("203.0.113.7", 4000), ("198.51.100.1", 443))
            again = encode_v1(("203.0.113.7", 4001), ("198.51.100.1", 443))
            other = encode_v1(("203.0.113.8", 4000), ("198.51.100.1", 443))
            # All from the same real source address: only the header tells them apart.
            a, ok_a = await open_from(port, "127.0.4.1", first)
            b, ok_b = await open_from(port, "127.0.4.1", again)
            c, ok_c = await open_from(port, "127.0.4.1", other)
            assert (ok_a, ok_b, ok_c) == (True, False, True)
            view = await by_client(daemon)
            assert set(view) == {"203.0.113.7", "203.0.113.8"}
            assert view["203.0.113.7"]["rejected"]["max_connections"] == 1
            assert view["203.0.113.7"]["active"] == 1
            await close_all([a, b, c])


@_LIMITS_PER_WORKER
async def test_reload_applies_new_client_limits_to_new_connections(tmp_path: Path) -> None:
    import signal

    async with EchoUpstream() as up:
        port = free_port()
        cfg = daemon_config(listener_config("app", [up.address], listen=f"{LOOPBACK}:{port}"))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            held = [(await open_from(port, "127.0.5.1"))[0] for _ in range(3)]
            cfg["listeners"][0]["client_limits"] = {"max_connections": 2}
            daemon.write_config(cfg)
            daemon.signal(signal.SIGHUP)
            await daemon.wait_for("config_reloaded")
            # The 3 open ones stay (never cut by a reload) and count against the new limit.
            extra, admitted = await open_from(port, "127.0.5.1")
            assert not admitted
            fresh, admitted = await open_from(port, "127.0.5.2")
            assert admitted
            view = await by_client(daemon)
            assert view["127.0.5.1"]["active"] == 3
            # Two of them close: their slots go, the count the reload made included them.
            await close_all(held[:2])
            await eventually(lambda: _active(daemon, "127.0.5.1", 1))
            again, admitted = await open_from(port, "127.0.5.1")
            assert admitted
            await close_all([held[2], extra, fresh, again])


async def _active(daemon: DaemonProcess, client: str, want: int) -> bool:
    return bool((await by_client(daemon))[client]["active"] == want)


async def test_two_workers_merge_clients_and_limit_per_worker(tmp_path: Path) -> None:
    """Limits are exact per worker process (docs/clients.md): with max_connections 3 and two
    workers, one address gets at most 3 in each; /clients sums both workers."""
    async with EchoUpstream() as up:
        cfg = daemon_config(
            listener_config("app", [up.address], client_limits={"max_connections": 3}), workers=2
        )
        async with DaemonProcess(tmp_path, cfg) as daemon:
            port = daemon.port("app")
            conns: list[Conn] = []
            admitted = 0
            for _ in range(16):
                conn, ok = await open_from(port, "127.0.6.1")
                admitted += ok
                conns.append(conn)
            for _ in range(5):
                conn, ok = await open_from(port, "127.0.6.2")
                conns.append(conn)
            workers = {r["id"].split("-")[0] for r in await daemon.connections()}
            assert workers == {"0", "1"}, "the kernel spread the connections over both workers"
            assert 3 < admitted <= 6, admitted
            view = await by_client(daemon)
            assert view["127.0.6.1"]["accepted"] == 16
            assert view["127.0.6.1"]["active"] == admitted
            assert view["127.0.6.1"]["rejected"]["max_connections"] == 16 - admitted
            assert view["127.0.6.2"]["accepted"] == 5
            m = await daemon.metrics()
            assert m[REJECTED.format("max_connections")] == 16 - admitted + (
                5 - view["127.0.6.2"]["active"]
            )
            assert m['connwatch_listener_limit{limit="client_max_connections",listener="app"}'] == 3
            await close_all(conns)


async def test_clients_query_errors_list_the_allowed_values(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address]))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            status, body = await daemon.get("/clients?sort=loudest")
            assert status == 400
            assert all(v in body.decode() for v in ("active", "accepted", "bytes", "rejected"))
            for bad in ("-1", "ten", "1.5"):
                status, body = await daemon.get(f"/clients?limit={bad}")
                assert status == 400
                assert b"whole number" in body
            conn, ok = await open_from(daemon.port("app"), "127.0.7.1")
            assert ok
            assert await clients(daemon, "?listener=nope") == []
            assert len(await clients(daemon, "?limit=0")) == 0
            assert [r["client"] for r in await clients(daemon, "?listener=app&sort=bytes")] == [
                "127.0.7.1"
            ]
            await close_all([conn])
