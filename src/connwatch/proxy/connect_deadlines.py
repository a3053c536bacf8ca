"""The per-try connect deadlines of one upstream pool, kept by one timer for all of them.

A timer handle per connect try (`loop.call_later` and its cancel) cost ~4.6k instructions a
connection (bench/instructions.py churn). A try that ends in time, by far the usual case, costs
here a small list, an append and a flag; one timer, armed at the earliest deadline pending,
cancels the tasks of the tries still running when their deadline passes, at the same moment a
timer handle of its own would have.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Any, Final

# A try is a list, not an object: a list display costs a fraction of a Python __init__ call.
# [deadline (time.monotonic()), task (None once the try ended), fired (its task was cancelled)]
DEADLINE: Final = 0
TASK: Final = 1
FIRED: Final = 2

Try = list[Any]


class ConnectDeadlines:
    """Tries in flight, in the order they started; `sweep` cancels those past their deadline."""

    __slots__ = ("_due", "_pending", "_timer")

    def __init__(self) -> None:
        self._pending: deque[Try] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._due = math.inf  # the deadline the timer is armed for

    def start(
        self, loop: asyncio.AbstractEventLoop, deadline: float, task: asyncio.Task[Any]
    ) -> Try:
        """A try of `task` that must end by `deadline`. The caller sets its TASK to None when it
        ends, whatever the outcome (no task is kept alive by a try that ended), and reads FIRED
        after a CancelledError."""
        pending = self._pending
        # Tries mostly end in the order they started: the ended ones at the head go now, so
        # the queue stays about as long as the connects in flight.
        while pending and pending[0][TASK] is None:
            pending.popleft()
        entry = [deadline, task, False]
        pending.append(entry)
        if deadline < self._due:  # none armed, or for a later one (a reload shortened the timeout)
            self._arm(loop, deadline)
        return entry

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._due = deadline
        # call_at takes the loop's clock; ours is time.monotonic(): the delay is the same.
        self._timer = loop.call_later(max(deadline - time.monotonic(), 0.0), self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel the tries past their deadline, forget the ended ones, rearm for the earliest
        deadline left (deadlines may come out of order after a reload shortens the timeout)."""
        self._timer, self._due = None, math.inf
        now = time.monotonic()
        left: deque[Try] = deque()
        for entry in self._pending:
            task = entry[TASK]
            if task is None:
                continue
            if entry[DEADLINE] <= now:
                entry[FIRED] = True
                task.cancel()
            else:
                left.append(entry)
        self._pending = left
        if left:
            self._arm(loop, min(entry[DEADLINE] for entry in left))

    def close(self) -> None:
        """Stop the timer (the pool is let go); tries still running are not cancelled."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due = math.inf
        self._pending.clear()

    def __len__(self) -> int:
        return sum(1 for entry in self._pending if entry[TASK] is not None)
