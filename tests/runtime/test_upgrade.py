"""Seamless upgrade (SPEC section 11), end to end with real processes: `run --takeover` takes the
listeners, admin and upgrade sockets over; the old process drains and exits 0; counters carry on;
config changes apply; every failure leaves the old process serving, unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from connwatch.commands.top.admin_client import AdminClient
from connwatch.runtime.upgrade.messages import (
    PROTOCOL_VERSION,
    MessageSocket,
    UpgradeError,
    close_fds,
)
from tests.runtime.upgrade_support import echo_once, failed_takeover, successor, upgrade_path
from tests.support import (
    LOOPBACK,
    DaemonProcess,
    EchoUpstream,
    daemon_config,
    eventually,
    free_port,
    http_request,
    listener_config,
    parse_metrics,
    run_probe,
)

ACCEPTED = 'connwatch_connections_accepted_total{listener="app"}'
C2U = 'connwatch_bytes_total{direction="client_to_upstream",listener="app"}'
U2C = 'connwatch_bytes_total{direction="upstream_to_client",listener="app"}'


def upgrades(metrics: dict[str, float], role: str, result: str) -> float:
    return metrics[f'connwatch_upgrades_total{{result="{result}",role="{role}"}}']


def config(upstream: EchoUpstream, path: str, **top: Any) -> dict[str, Any]:
    return daemon_config(listener_config("app", [upstream.address]), upgrade_socket=path, **top)


async def streaming_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(b"x" * 1000)
    assert await reader.readexactly(1000) == b"x" * 1000
    return reader, writer


@pytest.mark.parametrize(("old_workers", "new_workers"), [(1, 1), (2, 1), (1, 2)])
async def test_takeover_moves_the_listeners_and_keeps_the_counters(
    tmp_path: Path, old_workers: int, new_workers: int
) -> None:
    path = upgrade_path(tmp_path)
    async with EchoUpstream() as upstream:
        # No quiet-gap closing: the connection below pauses between exchanges.
        shutdown = {"drain_timeout": "20s", "quiet_close": False}
        cfg = config(upstream, path, workers=old_workers, shutdown=shutdown)
        old = await DaemonProcess(tmp_path, cfg).start()
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            port = old.port("app")
            assert await echo_once(port, b"before") == b"before"
            # A connection through the old process that keeps moving bytes across the upgrade.
            reader, writer = await streaming_client(port)
            new = await successor(tmp_path, "new", {**cfg, "workers": new_workers})
            try:
                await _served_through_the_upgrade(old, new, port, reader, writer)
                assert _exists(path)  # the upgrade socket is the new one's now
                assert new.port("app") == port
                assert new.admin_port == old.admin_port
            finally:
                writer.close()
                assert await new.stop() == 0
            assert not _exists(path)
        finally:
            await old.stop()


async def _served_through_the_upgrade(
    old: DaemonProcess,
    new: DaemonProcess,
    port: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    await old.wait_for("upgrade_released", role="handed_over")
    # While the old one drains, the new one's admin shows its connection and totals.
    records = await new.connections()
    assert len(records) == 1
    assert records[0]["bytes_client_to_upstream"] == 1000
    status, body = await new.get("/healthz")
    assert status == 200
    assert json.loads(body)["upgrade"]["state"] == "draining_predecessor"
    top = await asyncio.to_thread(AdminClient(f"{LOOPBACK}:{new.admin_port}").snapshot)
    assert top.upgrade is not None
    assert top.upgrade["state"] == "draining_predecessor"  # `connwatch top` shows it
    for _ in range(20):  # still served by the old process
        writer.write(b"y" * 1000)
        assert await reader.readexactly(1000) == b"y" * 1000
    assert await echo_once(port, b"after") == b"after"  # the new one serves
    writer.write_eof()
    assert await reader.read() == b""
    writer.close()
    assert await old.wait_exit(20) == 0
    await new.wait_for("upgrade_complete", role="took_over")
    assert old.find("upgrade_started", role="handed_over")
    assert old.find("upgrade_complete", role="handed_over")
    assert new.find("upgrade_started", role="took_over")
    metrics = await new.metrics()
    assert metrics[ACCEPTED] == 3
    assert metrics[C2U] == metrics[U2C] == len(b"before") + 21_000 + len(b"after")
    assert upgrades(metrics, "handed_over", "success") == 1
    assert upgrades(metrics, "took_over", "success") == 1
    status, body = await new.get("/healthz")
    assert json.loads(body) == {"status": "UP"}


async def test_config_change_applies_listeners_added_and_removed(tmp_path: Path) -> None:
    path = upgrade_path(tmp_path)
    async with EchoUpstream() as upstream:
        cfg = daemon_config(
            listener_config("app", [upstream.address]),
            listener_config("gone", [upstream.address]),
            upgrade_socket=path,
            workers=2,
        )
        old = await DaemonProcess(tmp_path, cfg).start()
        try:
            app, gone = old.port("app"), old.port("gone")
            assert await echo_once(gone) == b"ping"
            new_cfg = daemon_config(
                listener_config("app", [upstream.address]),
                listener_config("added", [upstream.address]),
                upgrade_socket=path,
                workers=1,
            )
            new = await successor(tmp_path, "new", new_cfg)
            try:
                assert await old.wait_exit(20) == 0
                assert new.port("app") == app
                assert await echo_once(app) == b"ping"
                assert await echo_once(new.port("added")) == b"ping"
                with pytest.raises(ConnectionRefusedError):
                    await echo_once(gone)
                metrics = await new.metrics()
                # The removed listener's totals stay (no counter goes back).
                assert metrics['connwatch_connections_accepted_total{listener="gone"}'] == 1
                assert metrics['connwatch_connections_accepted_total{listener="added"}'] == 1
            finally:
                assert await new.stop() == 0
        finally:
            await old.stop()


async def test_a_second_upgrade_continues_from_the_first(tmp_path: Path) -> None:
    path = upgrade_path(tmp_path)
    async with EchoUpstream() as upstream:
        cfg = config(upstream, path)
        first = await DaemonProcess(tmp_path, cfg).start()
        port = first.port("app")
        try:
            assert await echo_once(port) == b"ping"
            second = await successor(tmp_path, "second", cfg)
            assert await first.wait_exit(20) == 0
            await second.wait_for("upgrade_complete", role="took_over")
            assert await echo_once(port) == b"ping"
            third = await successor(tmp_path, "third", cfg)
            assert await second.wait_exit(20) == 0
            await third.wait_for("upgrade_complete", role="took_over")
            try:
                assert await echo_once(port) == b"ping"
                metrics = await third.metrics()
                assert metrics[ACCEPTED] == 3
                assert upgrades(metrics, "handed_over", "success") == 2
                assert upgrades(metrics, "took_over", "success") == 2
                ids = {r["id"] for r in await third.connections()}
                assert all(not i.startswith("0-") for i in ids)
            finally:
                assert await third.stop() == 0
        finally:
            await first.stop()


# -- failure is safe: the old process serves on, unchanged ------------------------------------------
async def _still_serving(old: DaemonProcess, port: int) -> dict[str, float]:
    assert old.proc is not None
    assert old.proc.returncode is None
    assert await echo_once(port, b"still") == b"still"
    status, _ = await old.get("/readyz")
    assert status == 200
    return await old.metrics()


async def test_no_upgrade_socket_fails_and_the_old_serves_on(tmp_path: Path) -> None:
    path = upgrade_path(tmp_path)
    async with EchoUpstream() as upstream:
        cfg = config(upstream, path)
        async with DaemonProcess(tmp_path, cfg) as old:
            code, err = await failed_takeover(
                tmp_path, "new", {**cfg, "upgrade_socket": path + "x"}
            )
            assert code == 1
            assert "cannot connect to upgrade socket" in err
            assert "keeps serving" in err
            await _still_serving(old, old.port("app"))


async def test_takeover_needs_an_upgrade_socket_in_its_config(tmp_path: Path) -> None:
    async with EchoUpstream() as upstream:
        cfg = daemon_config(listener_config("app", [upstream.address]))
        code, err = await failed_takeover(tmp_path, "new", cfg)
        assert code == 2
        assert "--takeover needs upgrade_socket" in err


async def test_invalid_new_config_fails_before_touching_the_old(tmp_path: Path) -> None:
    path = upgrade_path(tmp_path)
    async with EchoUpstream() as upstream:
        cfg = config(upstream, path)
        async with DaemonProcess(tmp_path, cfg) as old:
            bad = {**cfg, "workers": 0}
            code, err = await failed_takeover(tmp_path, "new", bad)
            assert code == 2
            assert "workers" in err
            metrics = await _still_serving(old, old.port("app"))
            assert not old.find("upgrade_started")
            assert upgrades(metrics, "handed_over", "failure") == 0


async def test_new_process_failing_to_bind_leaves_the_old_serving(tmp_path: Path) -> None:
    path = upgrade_path(tmp_path)
    async with EchoUpstream() as upstream:
        cfg = config(upstream, path)
        with socket.create_server((LOOPBACK, 0)) as taken:
            async with DaemonProcess(tmp_path, cfg) as old:
                port = old.port("app")
                added = listener_config("added", [upstream.address])
                added["listen"] = f"{LOOPBACK}:{taken.getsockname()[1]}"
                new_cfg = {**cfg, "listeners": [*cfg["listeners"], added]}
                code, err = await failed_takeover(tmp_path, "new", new_cfg)
                assert code == 1
                assert "already in use" in err
                await old.wait_for("upgrade_failed", role="handed_over")
                metrics = await _still_serving(old, port)
                assert upgrades(metrics, "handed_over", "failure") == 1
                assert upgrades(metrics, "handed_over", "success") == 0
                assert _exists(path)  # still the old one's


async def test_timeout_when_the_old_does_not_answer(tmp_path: Path) -> None:
    path = upgrade_path(tmp_path)
    async with EchoUpstream() as upstream:
        cfg = config(upstream, path)
        async with DaemonProcess(tmp_path, cfg) as old:
            port = old.port("app")
            old.signal(signal.SIGSTOP)  # alive, holding its sockets, answering nothing
            try:
                started = time.monotonic()
                code, err = await failed_takeover(tmp_path, "new", cfg)
                waited = time.monotonic() - started
            finally:
                old.signal(signal.SIGCONT)
            assert code == 1
            assert "within 10s" in err
            assert waited >= 10
            await old.wait_for("upgrade_failed", role="handed_over")
            await _still_serving(old, port)


async def test_a_second_takeover_at_once_is_refused(tmp_path: Path) -> None:
    path = upgrade_path(tmp_path)
    async with EchoUpstream() as upstream:
        cfg = config(upstream, path, workers=2)
        async with DaemonProcess(tmp_path, cfg) as old:
            port = old.port("app")
            # The first successor: received the sockets, has not said `release` yet.
            first = await _fake_successor(path)
            try:
                code, err = await failed_takeover(tmp_path, "second", cfg)
                assert code == 1
                assert "another takeover is already in progress" in err
            finally:
                first.close()  # the first goes away before `release`: the hand-over is abandoned
            await old.wait_for("upgrade_failed", role="handed_over")
            metrics = await _still_serving(old, port)
            assert upgrades(metrics, "handed_over", "failure") == 1
            # And a later takeover works.
            new = await successor(tmp_path, "third", cfg)
            try:
                assert await old.wait_exit(20) == 0
                assert await echo_once(port) == b"ping"
            finally:
                assert await new.stop() == 0


async def _fake_successor(path: str) -> MessageSocket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    conn = MessageSocket(sock)
    await conn.send({"op": "takeover", "version": PROTOCOL_VERSION, "pid": os.getpid()})
    answer, fds = await conn.receive()
    assert answer["ok"], answer
    kinds = [entry["kind"] for entry in answer["sockets"]]
    assert kinds.count("admin") == 1
    assert kinds.count("upgrade") == 1
    assert kinds.count("listener") == 2  # the primary's and the worker's (SO_REUSEPORT)
    close_fds(fds)
    return conn


async def test_the_old_dying_mid_way_fails_the_takeover(tmp_path: Path) -> None:
    """A predecessor that hands its sockets over and dies before `release`: the new process
    drains what it accepted and exits 1 (a fake old process, for a deterministic moment)."""
    path = upgrade_path(tmp_path)
    listening = socket.create_server((LOOPBACK, 0))
    port = listening.getsockname()[1]
    async with EchoUpstream() as upstream:
        cfg = daemon_config(listener_config("app", [upstream.address]), upgrade_socket=path)
        cfg["listeners"][0]["listen"] = f"{LOOPBACK}:{port}"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen()
        server.setblocking(False)

        async def fake_old() -> None:
            conn_sock, _ = await asyncio.get_running_loop().sock_accept(server)
            conn = MessageSocket(conn_sock)
            await conn.receive()
            entry = {"kind": "listener", "name": "app", "listen": cfg["listeners"][0]["listen"]}
            sockets = [entry, {"kind": "upgrade", "path": path}]
            answer = {"ok": True, "version": PROTOCOL_VERSION, "pid": 1, "sockets": sockets}
            await conn.send(answer, [listening.fileno(), server.fileno()])
            message, _ = await conn.receive()
            assert message["op"] == "release"
            conn.close()  # dies without answering

        task = asyncio.get_running_loop().create_task(fake_old())
        try:
            code, err = await failed_takeover(tmp_path, "new", cfg)
            await task
        finally:
            server.close()
            os.unlink(path)
        assert code == 1
        assert "closed the upgrade socket" in err
    # The listening socket is still ours: the failed successor did not take it away.
    listening.setblocking(False)
    client = socket.create_connection((LOOPBACK, port), timeout=5)
    await eventually(lambda: _accepts(listening))
    client.close()
    listening.close()


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _accepts(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


async def test_a_fresh_start_refuses_a_live_upgrade_socket(tmp_path: Path) -> None:
    path = upgrade_path(tmp_path)
    async with EchoUpstream() as upstream:
        cfg = config(upstream, path)
        async with DaemonProcess(tmp_path, cfg) as old:
            folder = tmp_path / "second"
            folder.mkdir()
            other = DaemonProcess(folder, cfg)
            with pytest.raises(AssertionError, match="served by a running connwatch"):
                await other.start()
            assert await other.wait_exit(10) == 1
            await _still_serving(old, old.port("app"))


def test_parse_metrics_is_what_the_sampler_reads() -> None:
    text = 'connwatch_upgrades_total{result="success",role="took_over"} 1.0\n'
    assert upgrades(parse_metrics(text), "took_over", "success") == 1


async def test_takeover_if_running_starts_fresh_then_takes_over(tmp_path: Path) -> None:
    """The systemd template's command: the same for the first start and every upgrade."""
    path = upgrade_path(tmp_path)
    async with EchoUpstream() as upstream:
        cfg = config(upstream, path)
        first = await DaemonProcess(tmp_path, cfg).start("--takeover-if-running")
        try:
            assert first.find("upgrade_skipped")
            port = first.port("app")
            folder = tmp_path / "second"
            folder.mkdir()
            second = await DaemonProcess(folder, cfg).start("--takeover-if-running")
            try:
                assert await first.wait_exit(20) == 0
                assert second.find("upgrade_started", role="took_over")
                assert await echo_once(port) == b"ping"
            finally:
                assert await second.stop() == 0
        finally:
            await first.stop()


async def test_heartbeat_responder_is_handed_over(tmp_path: Path) -> None:
    path = upgrade_path(tmp_path)
    async with EchoUpstream() as upstream:
        heartbeat = f"{LOOPBACK}:{free_port()}"
        cfg = config(upstream, path)
        cfg["admin"]["heartbeat_listen"] = heartbeat
        async with DaemonProcess(tmp_path, cfg) as old:
            assert (await run_probe(heartbeat, "--type", "heartbeat")).returncode == 0
            new = await successor(tmp_path, "new", cfg)
            try:
                assert await old.wait_exit(20) == 0
                assert (await run_probe(heartbeat, "--type", "heartbeat")).returncode == 0
            finally:
                assert await new.stop() == 0


async def test_the_new_admin_closes_a_connection_of_the_draining_old(tmp_path: Path) -> None:
    path = upgrade_path(tmp_path)
    async with EchoUpstream() as upstream:
        shutdown = {"drain_timeout": "20s", "quiet_close": False}
        cfg = config(upstream, path, workers=2, shutdown=shutdown)
        async with DaemonProcess(tmp_path, cfg) as old:
            reader, writer = await streaming_client(old.port("app"))
            try:
                new = await successor(tmp_path, "new", cfg)
                try:
                    await old.wait_for("upgrade_released", role="handed_over")
                    (record,) = await new.connections()
                    status, _ = await http_request(
                        "DELETE", new.admin_port, f"/connections/{record['id']}"
                    )
                    assert status == 202
                    assert await reader.read() == b""  # closed by the old process
                    assert await old.wait_exit(20) == 0
                    metrics = await new.metrics()
                    reason = (
                        'connwatch_connections_closed_total{listener="app",reason="admin_closed"}'
                    )
                    assert metrics[reason] == 1
                finally:
                    assert await new.stop() == 0
            finally:
                writer.close()


async def test_a_process_speaking_another_protocol_version_is_not_taken_over(
    tmp_path: Path,
) -> None:
    """A version that cannot speak this hand-over: the new process exits 1 before binding."""
    path = upgrade_path(tmp_path)
    async with EchoUpstream() as upstream:
        cfg = config(upstream, path)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen()
        server.setblocking(False)

        async def other_version() -> None:
            conn_sock, _ = await asyncio.get_running_loop().sock_accept(server)
            conn = MessageSocket(conn_sock)
            await conn.receive()
            await conn.send({"ok": True, "version": PROTOCOL_VERSION + 1, "sockets": []})
            with contextlib.suppress(UpgradeError):
                await conn.receive()  # the new process hangs up
            conn.close()

        task = asyncio.get_running_loop().create_task(other_version())
        try:
            code, err = await failed_takeover(tmp_path, "new", cfg)
            await task
        finally:
            server.close()
            os.unlink(path)
        assert code == 1
        assert f"speaks upgrade protocol {PROTOCOL_VERSION + 1}" in err
