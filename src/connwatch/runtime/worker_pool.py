"""Worker processes (`workers: N`): every worker binds each listener with SO_REUSEPORT and the
kernel spreads new connections over them. The primary process is worker 0 and also owns the
admin endpoint, the health checks and the heartbeat responder; it asks the other workers for their
state over one control socket each, so /metrics, /connections and /readyz cover all of them.

The control protocol is in control_channel.py.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from typing import Any

import structlog

from connwatch.runtime.control_channel import ControlChannel
from connwatch.snapshots import DaemonStats, stats_from_wire

log = structlog.get_logger("connwatch.workers")


class Worker:
    """The primary's handle on one worker process."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process, channel: ControlChannel):
        self.index = index
        self.proc = proc
        self.channel = channel


class WorkerPool:
    """Starts workers 1..N-1 and speaks to them for the primary."""

    def __init__(self) -> None:
        self.workers: dict[int, Worker] = {}

    async def spawn(self, count: int, init: dict[str, Any]) -> None:
        for index in range(1, count):
            self.workers[index] = await _spawn_one(index, init)
        log.info("workers_started", workers=count, pids=[w.proc.pid for w in self.workers.values()])

    async def _each(self, op: str, **args: Any) -> list[Any]:
        async def one(worker: Worker) -> Any:
            try:
                return await worker.channel.call(op, **args)
            except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
                log.warning("worker_unreachable", worker=worker.index, op=op, error=repr(exc))
                return None

        return list(await asyncio.gather(*(one(w) for w in self.workers.values())))

    async def statistics(self) -> list[DaemonStats]:
        return [stats_from_wire(raw) for raw in await self._each("stats") if raw is not None]

    async def connection_records(self, **query: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for records in await self._each("connections", **query):
            out.extend(records or [])
        return out

    async def close_connection(self, conn_id: str) -> bool:
        index = int(conn_id.split("-", 1)[0]) if conn_id.split("-", 1)[0].isdigit() else -1
        worker = self.workers.get(index)
        if worker is None:
            return False
        try:
            return bool(await worker.channel.call("close", id=conn_id))
        except (OSError, RuntimeError, TimeoutError):
            return False

    async def broadcast(self, op: str, **args: Any) -> None:
        await self._each(op, **args)

    async def stop(self, timeout: float) -> None:
        """Ask every worker to drain and exit; kill those still running after `timeout`."""
        await self._each("stop")
        for worker in self.workers.values():
            try:
                async with asyncio.timeout(timeout):
                    await worker.proc.wait()
            except TimeoutError:
                log.warning("worker_killed", worker=worker.index, pid=worker.proc.pid)
                worker.proc.kill()
                await worker.proc.wait()
            worker.channel.close()
        self.workers.clear()


async def _spawn_one(index: int, init: dict[str, Any]) -> Worker:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "connwatch",
            "_worker",
            "--index",
            str(index),
            "--fd",
            str(theirs.fileno()),
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
        )
    finally:
        theirs.close()
    channel = await ControlChannel.open(ours)
    await channel.call("init", **init)
    return Worker(index, proc, channel)
