"""The pool's one-timer connect deadlines (proxy/connect_deadlines.py), on the running loop
with real futures."""

from __future__ import annotations

import asyncio
import time

import pytest

from connwatch.proxy.connect_deadlines import FIRED, TASK, ConnectDeadlines

WAIT = 5.0  # seconds: an upper bound for what must happen at once


@pytest.mark.parametrize("order", ["long_first", "short_first"])
async def test_deadlines_cancel_only_tries_still_running_when_due(order: str) -> None:
    """One timer for all tries: the due one is cancelled on time whatever the order the tries
    started in (a reload may shorten the timeout); one that ended is left alone."""
    loop = asyncio.get_running_loop()
    deadlines = ConnectDeadlines()

    async def hang() -> None:
        await loop.create_future()  # its own: cancelling one try's task cancels what it awaits

    short, long_, ended = (asyncio.ensure_future(hang()) for _ in range(3))
    now = time.monotonic()
    tries = {"short": (short, 0.05), "long": (long_, 30.0), "ended": (ended, 0.01)}
    names = ["long", "short", "ended"] if order == "long_first" else ["short", "long", "ended"]
    entries = {n: deadlines.start(loop, now + tries[n][1], tries[n][0]) for n in names}
    entries["ended"][TASK] = None  # this try ended before its deadline
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(short, WAIT)
    took = time.monotonic() - started
    assert 0.03 <= took < 1.0, f"cancelled after {took:.3f}s, due after 0.05s"
    assert entries["short"][FIRED]
    assert not entries["long"][FIRED]
    assert not long_.done()
    assert not entries["ended"][FIRED]
    assert not ended.done()
    assert len(deadlines) == 1  # the long one
    deadlines.close()
    for task in (long_, ended):
        task.cancel()
    await asyncio.gather(long_, ended, return_exceptions=True)
