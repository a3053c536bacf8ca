"""TaskOwner (STYLE habit 9): it holds every background task, cancels what is left at shutdown,
and never swallows the cancellation aimed at the task that waits on it."""

from __future__ import annotations

import asyncio

import pytest

from connwatch.runtime.task_owner import TaskOwner


async def test_spawned_tasks_are_held_until_they_end_and_cancel_all_ends_the_rest() -> None:
    owner = TaskOwner()
    done = owner.spawn(asyncio.sleep(0), name="quick")
    forever = owner.spawn(asyncio.Event().wait(), name="forever")
    await done
    assert len(owner) == 1  # the finished one is let go; the running one is held
    await owner.cancel_all()
    assert forever.cancelled()
    assert len(owner) == 0


async def test_cancel_waits_for_the_tasks_and_reraises_an_error_they_raised() -> None:
    owner = TaskOwner()

    async def fails_when_cancelled() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = owner.spawn(fails_when_cancelled())
    await asyncio.sleep(0)  # let it start waiting
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await owner.cancel(task)
    assert task.done()


async def test_a_caller_cancelled_while_it_waits_on_cancel_is_cancelled_itself() -> None:
    owner = TaskOwner()
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()  # takes its time to clean up
            raise

    task = owner.spawn(slow_to_stop())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(owner.cancel(task))
    await asyncio.sleep(0)
    waiter.cancel()  # the caller's own cancellation must reach it, not be swallowed
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await waiter
    release.set()
    await owner.cancel_all()
    assert task.done()
