"""TaskOwner: the one owner of every background task of a daemon or worker process (Habit 9)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class TaskOwner:
    """Holds a strong reference to each task it starts until the task ends, and cancels the rest
    at shutdown. Not an `asyncio.TaskGroup`: the daemon's `start()` and `shutdown()` are separate
    calls (tests and the demo drive them), and one failed task (a health broadcast to a worker
    that went away) must not cancel its siblings. Like a TaskGroup it never swallows the
    CancelledError aimed at the task that awaits it."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Run `coro` as a task held until it ends (the loop keeps only weak references)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel(self, *tasks: asyncio.Task[Any]) -> None:
        """Cancel `tasks` and wait until they have ended; re-raise an error one of them raised.
        `asyncio.wait` does not raise their CancelledError, so a CancelledError reaching the
        caller is its own and propagates."""
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error

    async def cancel_all(self) -> None:
        """Cancel every task still running (but the caller's own) and wait until they end. Errors
        they raised stay unretrieved, so the loop's handler logs them as it always did."""
        current = asyncio.current_task()
        pending = [t for t in self._tasks if t is not current and not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
