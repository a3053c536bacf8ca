"""Worker processes (`workers: N`): every worker binds each listener with SO_REUSEPORT and the
kernel spreads new connections over them. The primary process is worker 0 and also owns the
admin endpoint, the health checks and the heartbeat responder; it asks the other workers for their
state over one control socket each, so /metrics, /connections and /readyz cover all of them.

The control protocol is JSON lines, one request and one answer at a time per worker:
`{"op": ..., ...}` → `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from connwatch.snapshots import DaemonStats, stats_from_wire

log = structlog.get_logger("connwatch.workers")

_CALL_TIMEOUT = 10.0  # seconds a worker may take to answer one control request
_MAX_LINE = 64 * 1024 * 1024  # bytes: a full /connections of one worker fits easily


class ControlChannel:
    """One end of a control socket: request/response over JSON lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, sock: socket.socket) -> ControlChannel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=_MAX_LINE)
        return cls(reader, writer)

    async def send(self, message: dict[str, Any]) -> None:
        self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        await self.writer.drain()

    async def receive(self) -> dict[str, Any] | None:
        line = await self.reader.readline()
        if not line:
            return None
        message: dict[str, Any] = json.loads(line)
        return message

    async def call(self, op: str, **args: Any) -> Any:
        async with self._lock, asyncio.timeout(_CALL_TIMEOUT):
            await self.send({"op": op, **args})
            answer = await self.receive()
        if answer is None:
            raise ConnectionError("worker closed its control socket")
        if not answer.get("ok"):
            raise RuntimeError(f"worker failed {op}: {answer.get('error')}")
        return answer.get("result")

    def close(self) -> None:
        self.writer.close()


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


# -- the worker side ----------------------------------------------------------------------------------
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


async def serve_control(channel: ControlChannel, handlers: dict[str, Handler]) -> None:
    """Answer the primary's requests until it says stop or goes away."""
    while (message := await channel.receive()) is not None:
        op = str(message.pop("op", ""))
        handler = handlers.get(op)
        try:
            if handler is None:
                raise ValueError(f"unknown op {op!r}")
            result = await handler(message)
        except Exception as exc:  # answered to the primary, which logs it
            await channel.send({"ok": False, "error": repr(exc)})
            continue
        await channel.send({"ok": True, "result": result})
        if op == "stop":
            return


def inherited_channel_socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    return sock


def close_quietly(channel: ControlChannel) -> None:
    with contextlib.suppress(Exception):
        channel.close()
