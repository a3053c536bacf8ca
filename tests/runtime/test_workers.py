"""`workers: 2`: two processes share the listener; one admin endpoint covers both (SPEC §8)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import pytest

from tests.support import (
    DaemonProcess,
    EchoUpstream,
    daemon_config,
    eventually,
    free_port,
    http_request,
    listener_config,
)


async def _hold(port: int, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    held = []
    for i in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"%03d" % i)
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"%03d" % i
        held.append((reader, writer))
    return held


async def test_two_workers_split_connections_and_one_admin_serves_both(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address]), workers=2)
        async with DaemonProcess(tmp_path, cfg) as daemon:
            await daemon.wait_for("worker_started")
            held = await _hold(daemon.port("app"), 40)
            records = await daemon.connections()
            assert len(records) == 40
            workers = {r["id"].split("-")[0] for r in records}
            assert workers == {"0", "1"}, "the kernel spread 40 connections over both workers"
            m = await daemon.metrics()
            assert m['connwatch_connections_active{listener="app"}'] == 40
            assert m['connwatch_connections_accepted_total{listener="app"}'] == 40
            assert m['connwatch_bytes_total{direction="client_to_upstream",listener="app"}'] == 120
            assert len(await daemon.connections("?limit=7")) == 7

            # DELETE reaches the worker that owns the connection
            in_worker_1 = next(r["id"] for r in records if r["id"].startswith("1-"))
            status, _ = await http_request(
                "DELETE", daemon.admin_port, f"/connections/{in_worker_1}"
            )
            assert status == 202
            closed = await daemon.wait_for("connection_closed", conn_id=in_worker_1)
            assert closed["reason"] == "admin_closed"

            for _, writer in held:
                writer.close()

            async def all_closed() -> dict[str, float] | None:
                m = await daemon.metrics()
                return m if m['connwatch_connections_active{listener="app"}'] == 0 else None

            m = await eventually(all_closed, timeout=10)
            assert sum(m[k] for k in m if k.startswith("connwatch_connections_closed_total")) == 40
            assert (
                m['connwatch_connections_closed_total{listener="app",reason="admin_closed"}'] == 1
            )
        assert daemon.proc is not None
        assert daemon.proc.returncode == 0
        assert len(daemon.find("shutdown_complete")) == 2


async def test_sighup_binds_the_new_listener_in_every_worker_on_one_port(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address]), workers=2)
        async with DaemonProcess(tmp_path, cfg) as daemon:
            await daemon.wait_for("worker_started")
            cfg["listeners"].append(listener_config("extra", [up.address]))
            daemon.write_config(cfg)
            daemon.signal(signal.SIGHUP)
            await daemon.wait_for("config_reloaded")
            # both processes bind the new listener, on the same port
            started = await daemon.wait_for("listener_started", listener="extra", count=2)
            first = daemon.find("listener_started", listener="extra")[0]
            assert started["port"] == first["port"]
            held = await _hold(started["port"], 12)
            ids = {r["id"].split("-")[0] for r in await daemon.connections("?listener=extra")}
            for _, writer in held:
                writer.close()
            assert ids == {"0", "1"}, daemon.find("listener_started")


def _children(pid: int) -> list[int]:
    """The live child processes of `pid` (from /proc: field 4 of stat is the parent)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited while we looked
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


async def test_a_worker_that_dies_before_it_is_ready_fails_the_start_clearly(
    tmp_path: Path,
) -> None:
    """The primary exits 1 naming the worker and how it ended, and takes the other worker
    down with it: no half-started daemon, no orphan (it waited 10 s, then printed
    `connwatch: ` and an empty TimeoutError, leaving the rest running)."""
    async with EchoUpstream() as up:
        daemon = DaemonProcess(tmp_path, daemon_config(listener_config("app", [up.address])))
        daemon.write_config(daemon_config(listener_config("app", [up.address]), workers=3))
        starting = asyncio.create_task(daemon.start())
        try:
            await daemon.wait_for("listener_started")  # bound: the workers come next
            assert daemon.proc is not None
            workers = await eventually(lambda: len(c := _children(daemon.proc.pid)) == 2 and c)
            victim, other = sorted(workers)
            os.kill(victim, signal.SIGKILL)  # long before it can import and answer `init`
            assert await asyncio.wait_for(daemon.proc.wait(), 15) == 1
            with pytest.raises(AssertionError, match="daemon exited before") as failed:
                await starting  # its message carries the daemon's stderr
            said = (
                rf"connwatch: worker \d \(pid {victim}\) did not start: it was killed by signal 9"
            )
            assert re.search(said, str(failed.value)), failed.value
            assert not await asyncio.to_thread(Path(f"/proc/{other}").exists), "no orphan worker"
        finally:
            starting.cancel()
            if daemon.proc is not None and daemon.proc.returncode is None:
                daemon.proc.kill()
                await daemon.proc.wait()


async def test_not_ready_until_every_worker_has_started(tmp_path: Path) -> None:
    """The primary serves /readyz while its workers start: 503 until they have (SPEC §8:
    /readyz covers all workers), 200 and `daemon_started` once they have."""
    async with EchoUpstream() as up:
        daemon = DaemonProcess(tmp_path, {})
        admin_port = free_port()  # known before daemon_started, which waits for the worker
        daemon.write_config(
            daemon_config(
                listener_config("app", [up.address]),
                admin={"listen": f"127.0.0.1:{admin_port}"},
                workers=2,
            )
        )
        starting = asyncio.create_task(daemon.start())
        held: list[int] = []
        try:
            await daemon.wait_for("listener_started")
            assert daemon.proc is not None
            held = await eventually(lambda: _children(daemon.proc.pid))
            os.kill(held[0], signal.SIGSTOP)  # a worker slow to start, held as long as we like
            status, body = await eventually(lambda: _readyz(admin_port))
            assert status == 503, body
            assert not daemon.find("daemon_started")
            os.kill(held.pop(), signal.SIGCONT)
            await asyncio.wait_for(starting, 20)
            status, body = await _readyz(admin_port)
            assert status == 200, body
        finally:
            for pid in held:
                os.kill(pid, signal.SIGCONT)
            starting.cancel()
            if daemon.proc is not None and daemon.proc.returncode is None:
                await daemon.stop()


async def _readyz(port: int) -> tuple[int, str] | None:
    """/readyz's status and body; None while nothing listens on `port` yet."""
    try:
        status, body = await http_request("GET", port, "/readyz")
    except OSError:
        return None
    return status, str(body)
