"""OrderedShutdown: the one ordered, deadline-bound shutdown. Stop accepting; drain up to
`shutdown.drain_timeout` (closing quiet connections early with `quiet_close`); close the rest with
reason `shutdown` (at `close_rate` per second); give them `_FINAL_CLOSE_WAIT` to finish, then abort
what is left. A second stop signal (`force`) skips the drain."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

from connwatch._types import CloseReason, ConnectionState
from connwatch.runtime.state import DaemonState

log = structlog.get_logger("connwatch.server")

_FINAL_CLOSE_WAIT = 5.0  # seconds to let closed connections finish after the drain deadline
_WORKER_GRACE = 5.0  # seconds more a worker gets to exit than its own drain and final wait


class OrderedShutdown:
    def __init__(self, state: DaemonState, close_everything: Callable[[], Awaitable[None]]) -> None:
        self._state = state
        self._close_everything = close_everything  # the daemon's: its parts differ by role
        self._force = asyncio.Event()  # a second stop signal: skip the drain

    def force(self) -> None:
        """Stop draining and close everything now, in the workers too (they drain on their own,
        each for up to drain_timeout, until told)."""
        self.close_all(CloseReason.SHUTDOWN, abort=True)
        self._force.set()
        pool = self._state.pool
        if pool.workers:
            self._state.tasks.spawn(pool.broadcast("force"))

    async def run(self) -> None:
        """Stop accepting, drain up to drain_timeout, close the rest (reason shutdown), stop."""
        state = self._state
        cfg = state.settings.shutdown
        state.draining = True
        log.info(
            "shutdown_started",
            open_connections=len(state.tracker),
            drain_timeout_s=cfg.drain_timeout,
        )
        for listener in state.listeners.values():
            listener.stop_accepting()
        workers = state.tasks.spawn(
            state.pool.stop(cfg.drain_timeout + _FINAL_CLOSE_WAIT + _WORKER_GRACE)
        )
        deadline = time.monotonic() + cfg.drain_timeout
        quiet = state.tasks.spawn(self._quiet_closer()) if cfg.quiet_close else None
        drained = await self._wait_empty(deadline)
        if quiet is not None:
            await state.tasks.cancel(quiet)
        if not drained:
            await self._close_remaining()
        await workers
        await self._close_everything()
        log.info("shutdown_complete", remaining_connections=len(state.tracker))

    async def _wait_empty(self, deadline: float) -> bool:
        tasks = self._state.tasks
        waiter = tasks.spawn(self._state.tracker.wait_empty())
        force = tasks.spawn(self._force.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, force},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            await tasks.cancel(waiter, force)
        return waiter in done

    async def _quiet_closer(self) -> None:
        """While draining, close each connection at its first quiet gap."""
        state = self._state
        period = state.settings.shutdown.quiet_period
        while True:
            now = time.monotonic()
            for conn in state.tracker.connections():
                if conn.state in (
                    ConnectionState.OPEN,
                    ConnectionState.HALF_CLOSED,
                ) and conn.is_quiet(period, now):
                    conn.close(CloseReason.SHUTDOWN)
            await asyncio.sleep(max(period / 4, 0.02))

    async def _close_remaining(self) -> None:
        state = self._state
        rate = state.settings.shutdown.close_rate
        if rate <= 0:
            self.close_all(CloseReason.SHUTDOWN)
        else:
            for conn in list(state.tracker.connections()):
                conn.close(CloseReason.SHUTDOWN)
                await asyncio.sleep(1.0 / rate)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_FINAL_CLOSE_WAIT):
                await state.tracker.wait_empty()
        self.close_all(CloseReason.SHUTDOWN, abort=True)

    def close_all(self, reason: CloseReason, *, abort: bool = False) -> None:
        for conn in list(self._state.tracker.connections()):
            conn.close(reason, abort=abort)
