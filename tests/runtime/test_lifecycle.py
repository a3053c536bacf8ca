"""Signals and reload of the daemon subprocess: drain on SIGTERM, live SIGHUP reloads, exits."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sys
from pathlib import Path

from tests.support import (
    DaemonProcess,
    EchoUpstream,
    daemon_config,
    listener_config,
)

MiB = 1024 * 1024


async def test_sigterm_during_transfer_drains_it_and_exits_0(tmp_path: Path) -> None:
    payload = (bytes(range(256)) * 4096) * 50  # 50 MiB
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address]))
        cfg["shutdown"] = {"drain_timeout": "20s", "quiet_close": True, "quiet_period": "500ms"}
        daemon = await DaemonProcess(tmp_path, cfg).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port("app"))

        async def send() -> None:
            for i in range(0, len(payload), MiB):
                writer.write(payload[i : i + MiB])
                await writer.drain()
                if i == 5 * MiB:
                    daemon.signal(signal.SIGTERM)  # mid-transfer
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        digest = hashlib.sha256()
        n = 0
        while data := await asyncio.wait_for(reader.read(MiB), 20):
            digest.update(data)
            n += len(data)
        await sender
        writer.close()
        assert n == len(payload)
        assert digest.digest() == hashlib.sha256(payload).digest()
        assert await daemon.wait_exit(30) == 0
        closed = daemon.find("connection_closed")
        assert [c["reason"] for c in closed] == ["client_closed"]
        assert daemon.find("shutdown_started")
        assert daemon.find("shutdown_complete")


async def test_new_connections_are_refused_while_draining(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address]))
        cfg["shutdown"] = {"drain_timeout": "3s", "quiet_close": False}
        daemon = await DaemonProcess(tmp_path, cfg).start()
        port = daemon.port("app")
        _, held = await asyncio.open_connection("127.0.0.1", port)
        await daemon.wait_for("connection_opened")
        daemon.signal(signal.SIGTERM)
        await daemon.wait_for("shutdown_started")
        status, _ = await daemon.get("/readyz")
        assert status == 503
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            pass
        else:  # accepted by the kernel before the listener closed: must not be proxied
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        assert await daemon.wait_exit(15) == 0
        reasons = [c["reason"] for c in daemon.find("connection_closed")]
        assert reasons == ["shutdown"]
        held.close()


async def test_second_stop_signal_skips_the_drain_and_exits_0(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address]))
        cfg["shutdown"] = {"drain_timeout": "60s", "quiet_close": False}
        daemon = await DaemonProcess(tmp_path, cfg).start()
        _, writer = await asyncio.open_connection("127.0.0.1", daemon.port("app"))
        await daemon.wait_for("connection_opened")
        daemon.signal(signal.SIGTERM)
        await daemon.wait_for("shutdown_started")
        daemon.signal(signal.SIGINT)
        assert await daemon.wait_exit(10) == 0
        writer.close()


async def test_sighup_adds_a_listener_without_cutting_connections(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address]))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port("app"))
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"

            cfg["listeners"].append(listener_config("extra", [up.address]))
            daemon.write_config(cfg)
            daemon.signal(signal.SIGHUP)
            await daemon.wait_for("config_reloaded")
            started = await daemon.wait_for("listener_started", listener="extra")
            r2, w2 = await asyncio.open_connection("127.0.0.1", started["port"])
            w2.write(b"new")
            assert await asyncio.wait_for(r2.readexactly(3), 5) == b"new"
            writer.write(b"after")  # the old connection was never cut
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"after"
            m = await daemon.metrics()
            assert m['connwatch_config_reloads_total{result="success"}'] == 1
            assert not daemon.find("connection_closed")
            writer.close()
            w2.close()


async def test_invalid_config_on_sighup_keeps_serving_and_counts_a_failure(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address]))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            daemon.config_path.write_text("listeners:\n  - name: app\n    bogus: 1\n")
            daemon.signal(signal.SIGHUP)
            failed = await daemon.wait_for("config_reload_failed")
            assert any("bogus" in e for e in failed["errors"])
            reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port("app"))
            writer.write(b"still")
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still"
            m = await daemon.metrics()
            assert m['connwatch_config_reloads_total{result="failure"}'] == 1
            assert m['connwatch_config_reloads_total{result="success"}'] == 0
            writer.close()


async def test_listen_address_in_use_exits_1(tmp_path: Path) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    cfg = daemon_config(listener_config("app", ["127.0.0.1:1"], listen=f"127.0.0.1:{port}"))
    daemon = DaemonProcess(tmp_path, cfg)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connwatch",
        "run",
        "-c",
        str(daemon.config_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    blocker.close()
    assert proc.returncode == 1
    assert b"already in use" in err


async def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connwatch",
        "run",
        "-c",
        str(tmp_path / "nope.yaml"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2
    assert b"nope.yaml" in err
