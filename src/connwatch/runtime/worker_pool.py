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

_FINAL_POLL = 0.05  # seconds between asking a stopping worker whether it has drained


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
        self.retired: list[DaemonStats] = []  # stopped workers' final statistics
        self.id_base = 0  # connection ids of worker i start "<id_base + i>-" (seamless upgrade)

    async def spawn(self, count: int, init: dict[str, Any], pass_fds: tuple[int, ...] = ()) -> None:
        for index in range(1, count):
            self.workers[index] = await _spawn_one(index, init, pass_fds)
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
        workers = list(self.workers.values())
        answers = await self._each("stats")
        # Read after the await: a worker that retired meanwhile is counted once, from `retired`.
        live = [
            stats_from_wire(raw)
            for worker, raw in zip(workers, answers, strict=True)
            if raw is not None and self.workers.get(worker.index) is worker
        ]
        return [*live, *self.retired]

    async def connection_records(self, **query: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for records in await self._each("connections", **query):
            out.extend(records or [])
        return out

    async def client_records(self, **query: Any) -> list[list[dict[str, Any]]]:
        """Each worker's raw `/clients` records (merged by the caller)."""
        return [records or [] for records in await self._each("clients", **query)]

    async def close_connection(self, conn_id: str) -> bool:
        index = int(conn_id.split("-", 1)[0]) if conn_id.split("-", 1)[0].isdigit() else -1
        worker = self.workers.get(index - self.id_base)
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
        deadline = asyncio.get_running_loop().time() + timeout
        for worker in list(self.workers.values()):
            final = await _final_figures(worker, deadline)  # it drains, then reports them
            # Together, with no await between: counted live or retired, never both, never neither.
            del self.workers[worker.index]
            if final is not None:
                self.retired.append(stats_from_wire(final))
            worker.channel.close()  # it exits once we hang up
            try:
                async with asyncio.timeout_at(deadline + 1.0):
                    await worker.proc.wait()
            except TimeoutError:
                log.warning("worker_killed", worker=worker.index, pid=worker.proc.pid)
                worker.proc.kill()
                await worker.proc.wait()


async def _final_figures(worker: Worker, deadline: float) -> dict[str, Any] | None:
    """A stopping worker's statistics once it has drained (None if it died or ran out of time)."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        try:
            raw = await worker.channel.call("stats")
        except (OSError, RuntimeError, TimeoutError, ValueError):
            return None
        if raw.get("final"):
            return dict(raw)
        await asyncio.sleep(_FINAL_POLL)
    return None


async def _spawn_one(index: int, init: dict[str, Any], pass_fds: tuple[int, ...] = ()) -> Worker:
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
            pass_fds=(theirs.fileno(), *pass_fds),
            stdin=subprocess.DEVNULL,
        )
    finally:
        theirs.close()
    channel = await ControlChannel.open(ours)
    await channel.call("init", **init)
    return Worker(index, proc, channel)
