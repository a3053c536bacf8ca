"""The control channel between the primary and one worker process: JSON lines, one request and
one answer at a time per worker: `{"op": ..., ...}` → `{"ok": true, "result": ...}` or
`{"ok": false, "error": "..."}`. The primary calls (`ControlChannel.call`); a worker answers
(`serve_control`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from connwatch.runtime.request_pairs import RequestPairs

_CALL_TIMEOUT = 10.0  # seconds a worker may take to answer one control request
_MAX_LINE = 64 * 1024 * 1024  # bytes: a full /connections of one worker fits easily


class ControlChannel:
    """One end of a control socket: request/response over JSON lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._pairs: RequestPairs[dict[str, Any]] = RequestPairs()
        self.timeout = _CALL_TIMEOUT

    @classmethod
    async def open(cls, sock: socket.socket) -> ControlChannel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=_MAX_LINE)
        return cls(reader, writer)

    async def send(self, message: dict[str, Any]) -> None:
        self.writer.write(_line(message))
        await self.writer.drain()

    async def receive(self) -> dict[str, Any] | None:
        line = await self.reader.readline()
        if not line:
            return None
        message: dict[str, Any] = json.loads(line)
        return message

    async def call(self, op: str, **args: Any) -> Any:
        """One request and its answer (late answers to abandoned requests skipped: RequestPairs)."""

        async def send() -> None:
            self.writer.write(_line({"op": op, **args}))  # queued whole: never half sent

        answer = await self._pairs.call(send, self._answer, self.timeout)
        if not answer.get("ok"):
            raise RuntimeError(f"worker failed {op}: {answer.get('error')}")
        return answer.get("result")

    async def _answer(self) -> dict[str, Any]:
        await self.writer.drain()  # the request's flow control: it is on its way already
        answer = await self.receive()
        if answer is None:
            raise ConnectionError("worker closed its control socket")
        return answer

    def close(self) -> None:
        self.writer.close()


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


async def serve_control(
    channel: ControlChannel, handlers: dict[str, Handler], *, stop_ends: bool = True
) -> None:
    """Answer the primary's requests until it says stop (unless `stop_ends` is false: a draining
    worker goes on answering) or goes away."""
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
        if op == "stop" and stop_ends:
            return


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def inherited_channel_socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    return sock


def close_quietly(channel: ControlChannel) -> None:
    with contextlib.suppress(Exception):
        channel.close()
