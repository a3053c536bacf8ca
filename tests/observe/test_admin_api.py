"""The admin endpoint and socket options, read from a daemon running in this process."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime
from typing import Any

import pytest

from connwatch.proxy.sockopts import read_keepalive
from tests.support import (
    EchoUpstream,
    daemon_config,
    eventually,
    http_request,
    listener_config,
    running_daemon,
)

KEEPALIVE = {
    "client": {"enabled": True, "idle": "7s", "interval": "3s", "count": 4, "user_timeout": "20s"},
    "upstream": {
        "enabled": True,
        "idle": "11s",
        "interval": "2s",
        "count": 6,
        "user_timeout": "0s",
    },
}
SPEC_FIELDS = {
    "id",
    "listener",
    "client",
    "upstream",
    "opened_at",
    "age_s",
    "idle_s",
    "bytes_client_to_upstream",
    "bytes_upstream_to_client",
    "state",
    "liveness",
    "heartbeat",
    "tcp",
}


async def _echo_once(
    port: int, payload: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
    return reader, writer


@pytest.mark.both_loops
async def test_keepalive_options_are_set_on_both_legs() -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address], keepalive=KEEPALIVE))
        async with running_daemon(cfg) as daemon:
            _, writer = await _echo_once(daemon.listeners["app"].port, b"x")
            (conn,) = daemon.tracker.connections()
            client = read_keepalive(conn.client_socket)
            upstream = read_keepalive(conn.upstream_socket)
            assert client is not None
            assert upstream is not None
            assert (client.enabled, client.idle_s, client.interval_s, client.count) == (
                True,
                7,
                3,
                4,
            )
            assert client.user_timeout_ms == 20000
            assert (upstream.enabled, upstream.idle_s, upstream.interval_s, upstream.count) == (
                True,
                11,
                2,
                6,
            )
            assert upstream.user_timeout_ms == 0
            writer.close()


async def test_keepalive_disabled_is_off_on_the_socket() -> None:
    off = {"client": {"enabled": False}, "upstream": {"enabled": False}}
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address], keepalive=off))
        async with running_daemon(cfg) as daemon:
            _, writer = await _echo_once(daemon.listeners["app"].port, b"x")
            (conn,) = daemon.tracker.connections()
            for sock in (conn.client_socket, conn.upstream_socket):
                readback = read_keepalive(sock)
                assert readback is not None
                assert readback.enabled is False
            writer.close()


async def _get_json(port: int, path: str) -> Any:
    status, body = await http_request("GET", port, path)
    assert status == 200, body
    return json.loads(body)


@pytest.mark.both_loops
async def test_connections_lists_every_spec_field_with_exact_bytes() -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(
            listener_config("app", [up.address]), listener_config("b", [up.address])
        )
        async with running_daemon(cfg) as daemon:
            port, admin = daemon.listeners["app"].port, daemon.admin.port
            _, w1 = await _echo_once(port, b"a" * 1000)
            _, w2 = await _echo_once(port, b"b" * 10)
            _, w3 = await _echo_once(daemon.listeners["b"].port, b"c")
            records = await _get_json(admin, "/connections")
            assert len(records) == 3
            by_bytes = {r["bytes_client_to_upstream"]: r for r in records}
            first = by_bytes[1000]
            assert set(first) >= SPEC_FIELDS
            assert first["bytes_upstream_to_client"] == 1000
            assert first["listener"] == "app"
            assert first["upstream"] == up.address
            assert re.fullmatch(r"127\.0\.0\.1:\d+", first["client"])
            assert first["state"] == "open"
            assert first["opened_at"].endswith("Z")
            datetime.fromisoformat(first["opened_at"].replace("Z", "+00:00"))
            assert first["age_s"] >= first["idle_s"] >= 0
            assert set(first["heartbeat"]) >= {"state", "failures", "interval_s"}
            ids = {r["id"] for r in records}
            assert len(ids) == 3

            only_b = await _get_json(admin, "/connections?listener=b")
            assert [r["bytes_client_to_upstream"] for r in only_b] == [1]
            assert len(await _get_json(admin, "/connections?limit=2")) == 2
            assert await _get_json(admin, "/connections?min_idle=3600") == []
            status, _ = await http_request("GET", admin, "/connections?limit=x")
            assert status == 400

            # the id is the logs' conn_id and DELETE closes it with reason admin_closed
            target = first["id"]
            status, _ = await http_request("DELETE", admin, f"/connections/{target}")
            assert status == 202
            await eventually(lambda: daemon.tracker.get(target) is None, timeout=5)
            stats = daemon.statistics().listeners["app"]
            assert stats.closed.get("admin_closed") == 1
            status, _ = await http_request("DELETE", admin, "/connections/nope")
            assert status == 404
            for w in (w1, w2, w3):
                w.close()


async def test_delete_needs_the_token_when_one_is_set() -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address]))
        cfg["admin"]["token"] = "t0ken"
        async with running_daemon(cfg) as daemon:
            _, writer = await _echo_once(daemon.listeners["app"].port, b"x")
            (conn,) = daemon.tracker.connections()
            admin = daemon.admin.port
            path = f"/connections/{conn.id}"
            assert (await http_request("DELETE", admin, path))[0] == 401
            bad = {"Authorization": "Bearer nope"}
            assert (await http_request("DELETE", admin, path, bad))[0] == 401
            good = {"Authorization": "Bearer t0ken"}
            assert (await http_request("DELETE", admin, path, good))[0] == 202
            writer.close()


async def test_healthz_readyz_and_metrics_content_types() -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address]))
        async with running_daemon(cfg) as daemon:
            admin = daemon.admin.port
            assert await _get_json(admin, "/healthz") == {"status": "UP"}
            ready = await _get_json(admin, "/readyz")  # checks off: bound is enough
            assert ready["status"] == "UP"
            assert ready["listeners"]["app"]["upstreams"][up.address]["status"] == "UNKNOWN"
            status, body = await http_request(
                "GET", admin, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
            )
            assert status == 200
            assert body.rstrip().endswith(b"# EOF")
            assert b"connwatch_build_info" in body
