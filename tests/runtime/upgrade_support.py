"""Helpers of the seamless-upgrade tests: a successor started with `--takeover`, a takeover
expected to fail, and one echo exchange."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from tests.support import LOOPBACK, DaemonProcess


def upgrade_path(tmp_path: Path) -> str:
    """A short socket path (Unix socket addresses are at most 107 bytes)."""
    path = Path("/tmp") / f"cw-up-{os.getpid()}-{abs(hash(tmp_path)) % 10**8}.sock"
    return str(path)


async def successor(tmp_path: Path, name: str, config: dict[str, Any]) -> DaemonProcess:
    """`connwatch run --takeover` with `config`, started (its `daemon_started` seen)."""
    folder = tmp_path / name
    folder.mkdir()
    return await DaemonProcess(folder, config).start("--takeover")


async def failed_takeover(
    tmp_path: Path, name: str, config: dict[str, Any], timeout: float = 40
) -> tuple[int, str]:
    """`connwatch run --takeover` expected to give up: its exit code and stderr."""
    folder = tmp_path / name
    folder.mkdir()
    process = DaemonProcess(folder, config)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connwatch",
        "run",
        "-c",
        str(process.config_path),
        "--takeover",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def echo_once(port: int, payload: bytes = b"ping") -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(payload)
        writer.write_eof()
        return await reader.read()
    finally:
        writer.close()
