"""The upgrade conversation's request/answer pairs: the successor's scrape of a draining old
process gives up after a bound; the answer that comes later is not taken for the next request."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from connwatch.runtime.upgrade.messages import MessageSocket


@contextlib.asynccontextmanager
async def _pair() -> AsyncIterator[tuple[MessageSocket, MessageSocket]]:
    """The successor's end and the old process's end of one upgrade conversation."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    successor, old = MessageSocket(ours), MessageSocket(theirs)
    try:
        yield successor, old
    finally:
        successor.close()
        old.close()


async def test_a_late_answer_after_a_timeout_is_skipped() -> None:
    async with _pair() as (successor, old):
        with pytest.raises(TimeoutError):
            await successor.call({"op": "stats", "n": 1}, 0.2)  # the old process answers too late
        assert (await old.receive())[0] == {"op": "stats", "n": 1}
        await old.send({"ok": True, "n": 1})
        call = asyncio.create_task(successor.call({"op": "stats", "n": 2}, 10.0))
        assert (await old.receive())[0] == {"op": "stats", "n": 2}
        await old.send({"ok": True, "n": 2})
        assert await call == {"ok": True, "n": 2}  # not the late answer to n=1


async def test_a_late_answer_after_a_cancelled_call_is_skipped() -> None:
    async with _pair() as (successor, old):
        call = asyncio.create_task(successor.call({"op": "connections"}, 10.0))
        assert (await old.receive())[0] == {"op": "connections"}
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        later = asyncio.create_task(successor.call({"op": "stats"}, 10.0))
        await old.send({"ok": True, "result": ["late: the records"]})
        assert (await old.receive())[0] == {"op": "stats"}
        await old.send({"ok": True, "stats": {}, "final": True})
        assert await later == {"ok": True, "stats": {}, "final": True}
