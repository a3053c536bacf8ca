"""A coroutine run on the loop's callbacks, as a Task runs it, without what a Task costs.

Every connection's set-up (admit, connect the upstream) is a coroutine of its own. As an
`asyncio.Task` it cost ~8k instructions a connection (bench/instructions.py churn) before its
first step: the task is registered in asyncio's weak set of all tasks (a Python `WeakSet.add`,
and its weakref callback when the task dies), and every step runs in a copied context. The set-up
needs neither: nothing asks `asyncio.all_tasks()` for it or `current_task()` inside it (its
connect is given this object instead), and it sets no context variables.

What is kept of a Task: the first step is scheduled (call_soon), a step runs until the coroutine
awaits a future, the future's completion runs the next step; `cancel()` cancels the future awaited
(else the next step throws CancelledError in); `uncancel()` counts as Task.uncancel does, so an
`asyncio.timeout`-like deadline can tell its own cancellation from another's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol


class Cancellable(Protocol):
    """What a connect try needs of the task it runs in (an asyncio.Task, or a CoroutineRun)."""

    def cancel(self, msg: Any = None) -> bool: ...

    def uncancel(self) -> int: ...


def run(
    coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop, *, task: bool
) -> Cancellable:
    """`coro` run as an asyncio.Task when `task` (it needs one), else as a CoroutineRun."""
    return loop.create_task(coro) if task else CoroutineRun(coro, loop)


class CoroutineRun:
    """Runs `coro` to its end on `loop`; its result is dropped, an exception is reported to the
    loop's exception handler (a Task would log it when collected)."""

    __slots__ = ("_cancelling", "_coro", "_done", "_loop", "_must_cancel", "_waiting")

    def __init__(self, coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop) -> None:
        self._coro = coro
        self._loop = loop
        self._waiting: asyncio.Future[Any] | None = None
        self._cancelling = 0  # cancel() requests not yet taken back by uncancel()
        self._must_cancel = False
        self._done = False
        loop.call_soon(self._step)

    def done(self) -> bool:
        return self._done

    def cancel(self, msg: Any = None) -> bool:
        if self._done:
            return False
        self._cancelling += 1
        waiting = self._waiting
        if waiting is not None and waiting.cancel(msg=msg):
            return True  # its completion runs the next step, which raises CancelledError
        self._must_cancel = True
        return True

    def uncancel(self) -> int:
        if self._cancelling > 0:
            self._cancelling -= 1
        return self._cancelling

    def _step(self, _done: object = None) -> None:
        self._waiting = None
        try:
            if self._must_cancel:
                self._must_cancel = False
                awaited = self._coro.throw(asyncio.CancelledError())
            else:
                awaited = self._coro.send(None)
        except (StopIteration, asyncio.CancelledError):
            self._done = True
            return
        except (KeyboardInterrupt, SystemExit):
            self._done = True
            raise
        except BaseException as exc:
            self._done = True
            self._loop.call_exception_handler(
                {"message": "unhandled exception in a coroutine run", "exception": exc}
            )
            return
        # As Task.__step does with what the coroutine yielded (inline: two steps a connection).
        if awaited is None:  # a bare yield: run again soon
            self._loop.call_soon(self._step)
            return
        if not getattr(awaited, "_asyncio_future_blocking", False):
            self._coro.close()
            self._done = True
            raise RuntimeError(f"a coroutine run yielded {awaited!r}, not a future")
        awaited._asyncio_future_blocking = False
        self._waiting = awaited
        awaited.add_done_callback(self._step)
        if self._must_cancel and awaited.cancel():
            self._must_cancel = False
