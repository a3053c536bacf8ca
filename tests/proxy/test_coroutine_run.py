"""The set-up's cheap Task stand-in (proxy/coroutine_run.py) and the pool's one-timer connect
deadlines (proxy/connect_deadlines.py), on the running loop with real futures."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from connwatch.proxy.connect_deadlines import FIRED, TASK, ConnectDeadlines
from connwatch.proxy.coroutine_run import CoroutineRun

WAIT = 5.0  # seconds: an upper bound for what must happen at once


async def _until(run: CoroutineRun) -> None:
    deadline = time.monotonic() + WAIT
    while not run.done():
        assert time.monotonic() < deadline, "the coroutine run did not end"
        await asyncio.sleep(0)


async def test_runs_a_coroutine_through_its_awaits_to_its_end() -> None:
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    seen: list[Any] = []

    async def body() -> None:
        seen.append(await first)
        await asyncio.sleep(0)  # a bare yield on the way
        seen.append(await second)

    run = CoroutineRun(body(), loop)
    assert not seen  # the first step is scheduled, as a Task's is
    loop.call_soon(first.set_result, 1)
    loop.call_later(0.01, second.set_result, 2)
    await _until(run)
    assert seen == [1, 2]
    assert not run.cancel()  # nothing left to cancel


async def test_cancel_while_awaiting_raises_in_the_coroutine_and_uncancel_counts() -> None:
    loop = asyncio.get_running_loop()
    never = loop.create_future()
    caught: list[int] = []
    run: CoroutineRun

    async def body() -> None:
        try:
            await never
        except asyncio.CancelledError:
            caught.append(run.uncancel())
            raise

    run = CoroutineRun(body(), loop)
    await asyncio.sleep(0)  # its first step: now awaiting `never`
    assert run.cancel()
    await _until(run)
    assert never.cancelled()
    assert caught == [0]


async def test_cancel_before_the_first_step_throws_in_at_once() -> None:
    loop = asyncio.get_running_loop()
    steps: list[str] = []

    async def body() -> None:
        steps.append("ran")  # never: cancelled before it started

    run = CoroutineRun(body(), loop)
    assert run.cancel()
    await _until(run)
    assert steps == []


async def test_an_exception_goes_to_the_loop_exception_handler() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:

        async def body() -> None:
            raise ValueError("boom")

        await _until(CoroutineRun(body(), loop))
    finally:
        loop.set_exception_handler(None)
    assert [type(c["exception"]) for c in reported] == [ValueError]


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
