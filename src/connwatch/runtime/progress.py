"""ProgressLines: a `connection_progress` line per open connection every `log.progress_interval`,
on one loop timer (not a sleeping task per connection), stopped while draining."""

from __future__ import annotations

import asyncio

from connwatch.runtime.state import DaemonState


class ProgressLines:
    def __init__(self, state: DaemonState) -> None:
        self._state = state
        self._timer: asyncio.TimerHandle | None = None

    def schedule(self) -> None:
        """(Re)arm the timer for the current interval; 0 turns the lines off."""
        self.cancel()
        interval = self._state.settings.log.progress_interval
        if interval > 0:
            self._timer = asyncio.get_running_loop().call_later(interval, self._tick)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        state = self._state
        if state.draining:
            return
        state.events.progress(state.tracker.connections(), state.settings.log.progress_interval)
        self.schedule()
