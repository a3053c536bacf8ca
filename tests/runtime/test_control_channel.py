"""The primary's control channel to a worker: an answer that arrives after its caller stopped
waiting (a timeout under load, a cancelled scrape) is never taken for the next request's."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from connwatch.runtime.control_channel import ControlChannel


@contextlib.asynccontextmanager
async def _pair() -> AsyncIterator[tuple[ControlChannel, ControlChannel]]:
    """The primary's end and a worker's end of one control socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    primary, worker = await ControlChannel.open(ours), await ControlChannel.open(theirs)
    try:
        yield primary, worker
    finally:
        primary.close()
        worker.close()


async def test_a_late_answer_after_a_timeout_is_skipped() -> None:
    async with _pair() as (primary, worker):
        primary.timeout = 0.2
        with pytest.raises(TimeoutError):
            await primary.call("connections")
        assert await worker.receive() == {"op": "connections"}
        await worker.send({"ok": True, "result": ["late: the records"]})
        primary.timeout = 10.0
        call = asyncio.create_task(primary.call("stats"))
        assert await worker.receive() == {"op": "stats"}
        await worker.send({"ok": True, "result": {"final": True}})
        assert await call == {"final": True}  # not the records meant for the call that gave up


async def test_a_late_answer_after_a_cancelled_call_is_skipped() -> None:
    async with _pair() as (primary, worker):
        call = asyncio.create_task(primary.call("stats", n=1))
        assert await worker.receive() == {"op": "stats", "n": 1}
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        later = asyncio.create_task(primary.call("stats", n=2))
        await worker.send({"ok": True, "result": 1})  # the cancelled call's answer, late
        assert await worker.receive() == {"op": "stats", "n": 2}
        await worker.send({"ok": True, "result": 2})
        assert await later == 2
