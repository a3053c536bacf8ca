"""Worker processes (`workers: N`): every worker binds each listener with SO_REUSEPORT and the
kernel spreads new connections over them. The primary process is worker 0 and also owns the
admin endpoint, the health checks and the heartbeat responder; it asks the other workers for their
state over one control socket each, so /metrics, /connections and /readyz cover all of them.

The control protocol is in control_channel.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from typing import Any

import structlog

from connwatch.exceptions import WorkerStartError
from connwatch.runtime.control_channel import ControlChannel
from connwatch.snapshots import DaemonStats, stats_from_wire

log = structlog.get_logger("connwatch.workers")

_FINAL_POLL = 0.05  # seconds between asking a stopping worker whether it has drained
# Seconds a new worker may take to import and answer `init`: far above the ~0.5 s it takes, so
# that a loaded node (or a run under valgrind) is not taken for a broken worker.
_START_TIMEOUT = 60.0


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
        """Start workers 1..count-1 side by side; if one does not start, kill the others and
        raise WorkerStartError (the primary then exits 1 rather than run short of workers)."""
        started = await asyncio.gather(
            *(_spawn_one(index, init, pass_fds) for index in range(1, count)),
            return_exceptions=True,
        )
        failed = [s for s in started if isinstance(s, BaseException)]
        if failed:
            for worker in started:
                if isinstance(worker, Worker):
                    worker.channel.close()
                    await _kill(worker.proc)
            raise failed[0]
        self.workers.update((w.index, w) for w in started if isinstance(w, Worker))
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
    channel.timeout, call_timeout = _START_TIMEOUT, channel.timeout
    try:
        await channel.call("init", **init)
    except (OSError, RuntimeError, ValueError) as exc:  # TimeoutError is an OSError
        channel.close()
        if not isinstance(exc, TimeoutError):  # it hung up: let it exit, to say how it did
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await proc.wait()
        why = _start_failure(proc, exc)
        await _kill(proc)
        raise WorkerStartError(f"worker {index} (pid {proc.pid}) did not start: {why}") from exc
    channel.timeout = call_timeout
    return Worker(index, proc, channel)


def _start_failure(proc: asyncio.subprocess.Process, exc: BaseException) -> str:
    """Why a worker did not start, in words an operator can act on."""
    code = proc.returncode
    if isinstance(exc, TimeoutError):
        return f"no answer to init within {_START_TIMEOUT:g} s"
    if code is None:
        return str(exc) or type(exc).__name__
    return f"it was killed by signal {-code}" if code < 0 else f"it exited with code {code}"


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()
