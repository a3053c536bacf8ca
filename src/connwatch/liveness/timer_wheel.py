"""One scheduler for every watched connection of the process: beats bucketed by due time behind
one loop timer.

Beats due within one `TICK` (10 ms) run in one wake-up, so 8,000 connections at a 1 s interval
cost ~100 timer callbacks a second, not 8,000.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from typing import Final

from connwatch._types import Clock
from connwatch.liveness.watch_records import WatchRecord

__all__ = ["NEVER", "TICK", "TimerWheel"]

TICK: Final = 0.01  # seconds: beats due within one tick run in one timer callback
_TIMER_SLACK: Final = 0.002  # seconds: loop timers (uvloop: whole ms) may fire this early
NEVER: Final = 2**62  # a slot (or time) that never comes


class TimerWheel:
    """Beats bucketed into `TICK`-wide slots of due time, served by one loop timer.

    Scheduling is a dict lookup and a list append; only a slot's first beat touches the heap of
    slot numbers. A record rescheduled or unwatched leaves a stale entry in its old slot, skipped
    when that slot runs (its `slot` no longer matches; it is 0 while not scheduled).
    """

    def __init__(self, clock: Clock, fire: Callable[[list[WatchRecord], float], None]) -> None:
        self._clock = clock
        self._fire = fire
        self._slots: dict[int, list[WatchRecord]] = {}
        self._order: list[int] = []  # heap of the slot numbers in _slots
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = NEVER

    def schedule(self, rec: WatchRecord, due: float) -> None:
        slot = int(due / TICK) + 1  # rounded up: a beat may run up to one tick late, never early
        rec.slot = slot  # >= 1; 0 is "not scheduled"
        bucket = self._slots.get(slot)
        if bucket is not None:
            bucket.append(rec)
            return
        self._slots[slot] = [rec]
        heapq.heappush(self._order, slot)
        if slot < self._timer_slot:
            self._arm(slot)

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, slot * TICK - self._clock()), self._run)
        self._timer_slot = slot

    def _run(self) -> None:
        self._timer = None
        self._timer_slot = NEVER
        now = self._clock()
        last = int((now + _TIMER_SLACK) / TICK)  # timers may round their delay down by a little
        order = self._order
        ready: list[WatchRecord] = []
        while order and order[0] <= last:
            slot = heapq.heappop(order)
            for rec in self._slots.pop(slot):
                if rec.slot == slot:
                    rec.slot = 0
                    ready.append(rec)
        try:
            self._fire(ready, now)
        finally:
            if order and self._timer is None:
                self._arm(order[0])

    def pending(self) -> list[WatchRecord]:
        """The records scheduled now (each once: stale entries of rescheduled ones skipped)."""
        return [rec for slot, bucket in self._slots.items() for rec in bucket if rec.slot == slot]

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_slot = NEVER
        for bucket in self._slots.values():
            for rec in bucket:
                rec.slot = 0
        self._slots.clear()
        self._order.clear()
