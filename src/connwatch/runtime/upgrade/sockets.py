"""Listening sockets on their way between processes: a worker exporting its own to the primary's
`upgrade_socket`, and sockets a worker inherited at start (pass_fds) turned back into objects."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

from connwatch.runtime.upgrade.messages import MessageSocket, UpgradeError

if TYPE_CHECKING:
    from connwatch.proxy.listener import Listener

EXPORT_TIMEOUT = 10.0  # seconds


async def connect_unix(path: str, timeout: float) -> MessageSocket:
    """A conversation with whoever serves `path`; UpgradeError when nobody does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, path)
    except TimeoutError as exc:
        sock.close()
        raise UpgradeError(f"no answer on upgrade socket {path} within {timeout:g}s") from exc
    except OSError as exc:
        sock.close()
        raise UpgradeError(
            f"cannot connect to upgrade socket {path}: {exc.strerror or exc}"
            " (is a connwatch with upgrade_socket running?)"
        ) from exc
    return MessageSocket(sock)


async def export_listeners(listeners: Mapping[str, Listener], path: str, worker: int) -> None:
    """A worker's part of a hand-over: send its listening sockets to its primary."""
    entries: list[dict[str, object]] = []
    fds: list[int] = []
    for name, listener in listeners.items():
        for sock in listener.listening_sockets():
            entries.append(
                {"kind": "listener", "name": name, "listen": str(listener.config.listen)}
            )
            fds.append(sock.fileno())
    conn = await connect_unix(path, EXPORT_TIMEOUT)
    try:
        async with asyncio.timeout(EXPORT_TIMEOUT):
            await conn.send({"op": "export", "worker": worker, "sockets": entries}, fds)
            answer, _ = await conn.receive()
        if not answer.get("ok"):
            raise UpgradeError(f"primary refused the export: {answer.get('error')}")
    finally:
        conn.close()


def adopt_fd(fd: int) -> socket.socket:
    """A socket object for a descriptor received from another process."""
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    return sock


def inherited_sockets(raw: Mapping[str, list[int]]) -> dict[str, list[socket.socket]]:
    """A worker's inherited listening sockets (their descriptor numbers came in `init`)."""
    return {name: [adopt_fd(fd) for fd in fds] for name, fds in raw.items()}
