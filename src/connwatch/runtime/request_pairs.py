"""One request and its answer at a time on a stream many callers share (the workers' control
channel, the upgrade conversation). A caller that stops waiting (timeout, cancellation) once its
request is on its way leaves its answer owed: the next call skips it, or every later answer would
be taken for the request after its own (a worker's `connections` list read as its `stats`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["RequestPairs"]

A = TypeVar("A")


def _nothing() -> None:
    return None


class RequestPairs(Generic[A]):
    """Pairs each request with its own answer on one ordered stream."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owed = 0  # answers still to come for callers that stopped waiting

    async def call(
        self,
        send: Callable[[], Awaitable[None]],
        receive: Callable[[], Awaitable[A]],
        timeout: float,
        *,
        unsent: Callable[[], None] = _nothing,
    ) -> A:
        """`send` the request, then `receive` answers until its own. `send` returns once the
        request will arrive whole; cut off before that, `unsent` runs (e.g. closing a stream
        a half-written request would corrupt)."""
        async with self._lock:
            sent = False
            try:
                async with asyncio.timeout(timeout):
                    await send()
                    sent = True
                    answer = await receive()
                    while self._owed:
                        self._owed -= 1  # that was a late answer to an abandoned request
                        answer = await receive()
                    return answer
            except (TimeoutError, asyncio.CancelledError):
                if sent:
                    self._owed += 1
                else:
                    unsent()
                raise
