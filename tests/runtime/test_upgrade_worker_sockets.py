"""Seamless upgrade with `workers: 2` on a port-0 listener (SPEC section 11): each old worker binds
its own SO_REUSEPORT socket, configured with the port the primary got, not the `listen` the user
wrote. The successor must keep every one of those sockets: one it dropped is closed for good when
the old worker releases it, and the clients queued in its backlog then are reset (the rare
`reset: 1` of test_upgrade_load.py, always in the first upgrade: after it one socket was left)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from tests.runtime.upgrade_support import echo_once, upgrade_path
from tests.support import DaemonProcess, EchoUpstream, daemon_config, listener_config

CLIENTS = 20  # each lands on either socket (by the kernel's hash): both are reached
CLIENT_TIMEOUT = 5.0  # seconds: a client queued on a socket nobody accepts from waits for ever
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def listening_sockets(port: int) -> set[int]:
    """The inodes of the TCP sockets listening on `port` (one per bound socket, however many
    descriptors or processes hold it)."""
    found: set[int] = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == _LISTEN and int(local.split(":")[1], 16) == port:
                found.add(inode)
    return found


async def test_every_old_workers_socket_is_kept_and_its_clients_served(tmp_path: Path) -> None:
    path = upgrade_path(tmp_path)
    async with EchoUpstream() as upstream:
        listener = listener_config("app", [upstream.address])
        cfg = daemon_config(listener, upgrade_socket=path, workers=2)
        old = await DaemonProcess(tmp_path, cfg).start()
        (tmp_path / "new").mkdir()
        new = DaemonProcess(tmp_path / "new", cfg)
        start = asyncio.get_running_loop().create_task(new.start("--takeover"))
        try:
            port = old.port("app")
            before = listening_sockets(port)
            assert len(before) == 2  # the primary's and the worker's
            (worker_pid,) = (await old.wait_for("workers_started"))["pids"]
            await _served_while_the_old_worker_is_stopped(new, port, worker_pid)
            await start
            assert await old.wait_exit(30) == 0
            await new.wait_for("upgrade_complete", role="took_over", timeout=30)
            # The same two sockets, held by the new processes alone now.
            assert listening_sockets(port) == before
            assert await echo_once(port, b"after") == b"after"
        finally:
            with contextlib.suppress(Exception):
                await start
            await new.stop()
            await old.stop()


async def _served_while_the_old_worker_is_stopped(
    new: DaemonProcess, port: int, worker_pid: int
) -> None:
    """Stop the old worker once it has exported its socket: the clients the kernel queues on
    that socket are served only if the successor accepts on it too."""
    # Logged once the sockets came (the worker's export is done); the release comes later.
    await new.wait_for("upgrade_started", role="took_over", timeout=30)
    os.kill(worker_pid, signal.SIGSTOP)
    try:
        payloads = [f"client {i}".encode() for i in range(CLIENTS)]
        async with asyncio.timeout(CLIENT_TIMEOUT):
            answers = await asyncio.gather(*(echo_once(port, p) for p in payloads))
        assert answers == payloads
    finally:
        os.kill(worker_pid, signal.SIGCONT)  # its release is due: the successor waits for it
