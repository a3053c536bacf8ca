"""`connwatch top` driven in a pseudo-terminal against a real daemon subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pexpect

from tests.support import DaemonProcess, EchoUpstream, daemon_config, free_port, listener_config

# CSI sequences, OSC strings and two-byte escapes: what rich writes around the text.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


class Screen:
    """`connwatch top` in a pseudo-terminal; `text` is everything it drew, escapes removed."""

    def __init__(self, admin_port: int, *args: str) -> None:
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "connwatch", "top", "--admin", f"http://127.0.0.1:{admin_port}", *args],
            dimensions=(40, 200),
            env={**os.environ, "TERM": "xterm-256color"},
            encoding="utf-8",
            codec_errors="replace",
        )
        self.raw = ""

    @property
    def text(self) -> str:
        return _ANSI.sub("", self.raw)

    def expect(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        """Read output until `pattern` appears in the text (blocking: run it in a thread)."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.text)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} not on the screen within {timeout}s:\n{self.text}"
                )
            try:
                self.raw += self.child.read_nonblocking(65536, timeout=0.2)
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                if not re.search(pattern, self.text):
                    raise AssertionError(f"top exited before {pattern!r}:\n{self.text}") from None

    def wait_exit(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while self.child.isalive():
            if time.monotonic() > deadline:
                raise AssertionError(f"top did not exit within {timeout}s:\n{self.text}")
            with contextlib.suppress(pexpect.TIMEOUT, pexpect.EOF):
                self.raw += self.child.read_nonblocking(65536, timeout=0.2)
        assert self.child.exitstatus is not None, f"killed by signal {self.child.signalstatus}"
        return int(self.child.exitstatus)

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
        self.child.close()


async def _client(port: int, size: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x" * size)
    await reader.readexactly(size)
    return reader, writer


async def _open_clients(daemon: DaemonProcess, sizes: tuple[int, ...]) -> list[Any]:
    return [await _client(daemon.port("app"), size) for size in sizes]


def _config(up: EchoUpstream) -> dict[str, Any]:
    return daemon_config(listener_config("app", [up.address]))


async def test_top_shows_connections_sorts_and_quits(tmp_path: Path) -> None:
    async with EchoUpstream() as up, DaemonProcess(tmp_path, _config(up)) as daemon:
        clients = await _open_clients(daemon, (1000, 50_000))
        ids = [record["id"] for record in await daemon.connections()]
        assert len(ids) == 2
        screen = Screen(daemon.admin_port, "--sort", "age")
        try:
            await asyncio.to_thread(screen.expect, r"sort: age")
            for conn_id in ids:
                await asyncio.to_thread(screen.expect, rf"(?<!\S){re.escape(conn_id)}\s+app\s")
            await asyncio.to_thread(screen.expect, r"2 active")
            assert "AGE ▼" in screen.text
            screen.child.send("b")
            await asyncio.to_thread(screen.expect, r"sort: bytes")
            await asyncio.to_thread(screen.expect, r"C→U ▼")
            screen.child.send("q")
            assert await asyncio.to_thread(screen.wait_exit) == 0
            # The terminal is back in line mode with echo, the cursor shown, the screen restored.
            local_modes = termios.tcgetattr(screen.child.child_fd)[3]
            assert local_modes & termios.ICANON
            assert local_modes & termios.ECHO
            tail = screen.raw[-64:]
            assert "\x1b[?25h" in tail  # cursor shown again
            assert "\x1b[?1049l" in tail  # back from the alternate screen
        finally:
            screen.close()
            for _, writer in clients:
                writer.close()


async def test_top_exits_1_when_the_daemon_goes_away(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        daemon = await DaemonProcess(tmp_path, _config(up)).start()
        screen = None
        try:
            clients = await _open_clients(daemon, (10,))
            screen = Screen(daemon.admin_port)
            await asyncio.to_thread(screen.expect, r"1 active")
            for _, writer in clients:
                writer.close()
            assert await daemon.stop() == 0
            await asyncio.to_thread(
                screen.expect, r"connwatch top: the daemon went away: .*connection refused"
            )
            assert await asyncio.to_thread(screen.wait_exit) == 1
        finally:
            if screen is not None:
                screen.close()
            await daemon.stop()


def _top(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connwatch", "top", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_top_once_prints_one_table_without_a_terminal(tmp_path: Path) -> None:
    async with EchoUpstream() as up, DaemonProcess(tmp_path, _config(up)) as daemon:
        clients = await _open_clients(daemon, (300,))
        try:
            admin = f"http://127.0.0.1:{daemon.admin_port}"
            result = await asyncio.to_thread(_top, "--admin", admin, "--once", "--listener", "app")
            assert result.returncode == 0, result.stderr
            assert "1 active" in result.stdout
            # The id is <worker>-1: the first connection of whichever worker the kernel chose.
            assert re.search(
                r"(?m)^\s*\d+-1\s+app\s+127\.0\.0\.1:\d+\s+" + re.escape(up.address), result.stdout
            )
            assert "\x1b[" not in result.stdout  # no terminal, no escapes
            other = await asyncio.to_thread(_top, "--admin", admin, "--once", "--listener", "x")
            assert other.returncode == 0
            assert "no open connections" in other.stdout
        finally:
            for _, writer in clients:
                writer.close()


def test_top_without_a_daemon_exits_1() -> None:
    result = _top("--admin", f"127.0.0.1:{free_port()}", "--once")
    assert result.returncode == 1
    assert "connection refused" in result.stderr
    assert result.stdout == ""


async def test_top_switches_to_the_clients_view_and_back(tmp_path: Path) -> None:
    async with EchoUpstream() as up, DaemonProcess(tmp_path, _config(up)) as daemon:
        clients = await _open_clients(daemon, (10, 20, 30))
        screen = Screen(daemon.admin_port)
        try:
            await asyncio.to_thread(screen.expect, r"3 active")
            screen.child.send("c")
            await asyncio.to_thread(screen.expect, r"sort: clients by active")
            await asyncio.to_thread(screen.expect, r"ACTIVE ▼")
            # One client key (127.0.0.1) holding all three connections.
            await asyncio.to_thread(screen.expect, r"(?m)^\s*127\.0\.0\.1\s+app\s+3\s+3\s")
            screen.child.send("b")
            await asyncio.to_thread(screen.expect, r"sort: clients by bytes")
            screen.child.send("c")
            await asyncio.to_thread(screen.expect, r"sort: bytes ▼\s+keys: b a i r sort, c clients")
            screen.child.send("q")
            assert await asyncio.to_thread(screen.wait_exit) == 0
        finally:
            screen.close()
            for _, writer in clients:
                writer.close()
