"""The bounded per-client view (SPEC section 12): the summary on its own, then `GET /clients`
against a daemon that sees 10,000 distinct client addresses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

from connwatch.observe.clients import ClientSummary, merge_records, top_records
from tests.support import LOOPBACK, DaemonProcess, EchoUpstream, daemon_config, listener_config
from tests.variant import skip_under

_BOUND_PER_WORKER = skip_under(
    "workers2",
    "the 2,048-key bound is per worker and connwatch_clients_tracked sums the workers "
    "(docs/clients.md); test_records_of_workers_merge_by_listener_and_client covers the merge",
)


# -- the summary -----------------------------------------------------------------------------------


def skewed_stream(light: int, heavy: dict[str, int], seed: int = 7) -> list[str]:
    keys = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(light)]
    for key, count in heavy.items():
        keys += [key] * count
    random.Random(seed).shuffle(keys)
    return keys


HEAVY = {f"192.0.2.{i}": 60 + 7 * i for i in range(1, 11)}


def test_summary_is_bounded_and_holds_the_heavy_hitters_exactly() -> None:
    summary = ClientSummary(capacity=512)
    peak = 0
    for n, key in enumerate(skewed_stream(5_000, HEAVY)):  # 5,700 connections: N/capacity ~ 11
        summary.seen(key, None, float(n))
        summary.closed(key, 3, 5, float(n))
        peak = max(peak, len(summary))
    assert peak == 512
    assert len(summary) > 512 * 7 // 8
    top = top_records(list(summary.records("app")), "accepted", 10)
    assert {r["client"]: r["accepted"] for r in top} == HEAVY
    for r in top:
        assert r["bytes_client_to_upstream"] == 3 * r["accepted"]
        assert r["bytes_upstream_to_client"] == 5 * r["accepted"]
        assert r["active"] == 0


def test_summary_error_bounds_what_a_late_key_may_have_missed() -> None:
    summary = ClientSummary(capacity=8)
    for i in range(100):
        summary.seen(f"k{i}", None, float(i))
        summary.closed(f"k{i}", 0, 0, float(i))
    summary.seen("late", None, 100.0)
    (rec,) = [r for r in summary.records("app") if r["client"] == "late"]
    assert rec["accepted"] == 1
    assert rec["accepted_error"] >= 1, "evicted keys had one connection each: it may be one of them"


def test_summary_keeps_clients_with_open_connections_over_idle_ones() -> None:
    summary = ClientSummary(capacity=16)
    summary.seen("holder", None, 0.0)  # one connection, still open
    for i in range(1000):
        summary.seen(f"k{i}", None, float(i))
        summary.closed(f"k{i}", 0, 0, float(i))
    held = {r["client"]: r for r in summary.records("app")}
    assert held["holder"]["active"] == 1
    assert held["holder"]["accepted_error"] == 0


def test_rejections_are_counted_per_limit_and_take_no_slot() -> None:
    summary = ClientSummary()
    summary.seen("a", None, 1.0)
    summary.seen("a", "max_connections", 2.0)
    summary.seen("a", "connection_rate", 3.0)
    assert dict(summary.rejections) == {"max_connections": 1, "connection_rate": 1}
    (rec,) = summary.records("app")
    assert rec["active"] == 1
    assert rec["accepted"] == 3
    assert rec["rejected"] == {"max_connections": 1, "connection_rate": 1}
    assert rec["last_seen"] == 3.0


def test_records_of_workers_merge_by_listener_and_client() -> None:
    a, b = ClientSummary(), ClientSummary()
    for _ in range(3):
        a.seen("x", None, 1.0)
    b.seen("x", "max_connections", 5.0)
    b.seen("y", None, 2.0)
    merged = merge_records([a.records("app"), b.records("app"), b.records("other")])
    top = top_records(merged, "accepted", 100)
    assert [(r["listener"], r["client"], r["accepted"]) for r in top] == [
        ("app", "x", 4),
        ("app", "y", 1),
        ("other", "y", 1),  # ties: the one with an open connection first
        ("other", "x", 1),
    ]
    assert top[0]["rejected"]["max_connections"] == 1
    assert top[0]["last_seen"].endswith("Z")
    assert [r["client"] for r in top_records(merge_records([a.records("app")]), "rejected", 1)] == [
        "x"
    ]


# -- 10,000 distinct clients through the daemon ----------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def source(i: int) -> str:
    """The i-th light client: 127.10.0.1, 127.10.0.2, ... (skipping .0 and .255)."""
    return f"127.{10 + i // 62_500}.{i // 250 % 250}.{i % 250 + 1}"


async def one_connection(port: int, src: str) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, port, local_addr=(src, 0))
    try:
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def tracked(daemon: DaemonProcess) -> float:
    return (await daemon.metrics())['connwatch_clients_tracked{listener="app"}']


@_BOUND_PER_WORKER
async def test_ten_thousand_clients_stay_bounded_and_the_top_ten_are_exact(tmp_path: Path) -> None:
    heavy = {f"127.20.0.{i}": 30 + 5 * i for i in range(1, 11)}  # 35 .. 80 connections each
    stream = [source(i) for i in range(10_000)]
    for src, count in heavy.items():
        stream += [src] * count
    random.Random(14).shuffle(stream)
    async with EchoUpstream() as up:
        cfg = daemon_config(
            listener_config("app", [up.address]), log={"level": "info", "connection_events": False}
        )
        async with DaemonProcess(tmp_path, cfg) as daemon:
            assert daemon.proc is not None
            port = daemon.port("app")
            for _ in range(200):  # warm the code paths and the allocator from one client
                await one_connection(port, "127.30.0.1")
            before = rss_kib(daemon.proc.pid)
            queue: asyncio.Queue[str] = asyncio.Queue()
            for src in stream:
                queue.put_nowait(src)
            seen_tracked: list[float] = []

            async def client() -> None:
                while not queue.empty():
                    await one_connection(port, queue.get_nowait())

            async def sample() -> None:
                while not queue.empty():
                    seen_tracked.append(await tracked(daemon))
                    await asyncio.sleep(0.5)

            deadline = time.monotonic() + 100
            async with asyncio.timeout(deadline - time.monotonic()):
                await asyncio.gather(sample(), *(client() for _ in range(32)))
            grown_kib = rss_kib(daemon.proc.pid) - before
            assert grown_kib < 8 * 1024, f"RSS grew {grown_kib} KiB for 10,000 distinct clients"
            final = await tracked(daemon)
            assert 2048 * 7 // 8 <= final <= 2048
            assert seen_tracked
            assert max(seen_tracked) <= 2048
            status, body = await daemon.get("/clients?limit=11&sort=accepted")
            assert status == 200
            top: list[dict[str, Any]] = json.loads(body)
            assert {r["client"]: r["accepted"] for r in top} == {**heavy, "127.30.0.1": 200}
            assert all(r["active"] == 0 for r in top)
            assert all(r["bytes_client_to_upstream"] == r["accepted"] for r in top)
            print(f"RSS growth {grown_kib} KiB; clients tracked {final:.0f}")
