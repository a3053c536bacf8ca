"""Health state of upstream targets: rise/fall, adaptive interval, one check task per target.

* `TargetHealth`: the pure state machine of one target (no I/O, no clock).
* `HealthMonitor`: one task per target and listener that runs checks (`checks.run_check`)
  forever, feeds its `TargetHealth` and writes the outcome into the `Target` (state, counters,
  latency) that the balancer, `/readyz` and the metrics read.

The interval runs from the start of one check to the start of the next, so a slow check does
not stretch the schedule; a check that takes longer than the wait is followed at once.

`run_check`, `CheckResult` and `MAX_REPLY` live in checks.py and are re-exported here.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from connwatch._types import HealthState
from connwatch.config import HealthCheckConfig
from connwatch.health.checks import MAX_REPLY, CheckResult, ProtocolErrorCallback, run_check
from connwatch.health.state_changes import StateChangeCallback, change_state
from connwatch.proxy.upstream import Target
from connwatch.snapshots import MonitorStats

__all__ = [
    "ADAPTIVE_FACTOR",
    "JITTER",
    "MAX_REPLY",
    "CheckResult",
    "HealthMonitor",
    "ProtocolErrorCallback",
    "StateChangeCallback",
    "TargetHealth",
    "Transition",
    "run_check",
]

log = structlog.get_logger("connwatch.health")

ADAPTIVE_FACTOR = 1.5  # SPEC section 8: each passing check stretches the interval by this
JITTER = 0.1  # ±10% on each wait, so sidecars started together do not probe in lockstep


# --- rise / fall and the adaptive interval ------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    old: HealthState
    new: HealthState


class TargetHealth:
    """The pure state machine of one target: no I/O, no clock; the monitor feeds it results.

    `rise` consecutive successes make the target UP, `fall` consecutive failures make it DOWN,
    from any other state including UNKNOWN. `interval` is the next wait before jitter: it grows
    by 1.5 times up to `max_interval` with each passing check that changed nothing, and returns to the
    base interval on any failure or state change.
    """

    def __init__(
        self,
        *,
        rise: int,
        fall: int,
        interval: float,
        max_interval: float,
        state: HealthState = HealthState.UNKNOWN,
    ) -> None:
        self.rise = rise
        self.fall = fall
        self.base_interval = interval
        self.max_interval = max(max_interval, interval)
        self.state = state
        self.successes = 0  # consecutive
        self.failures = 0  # consecutive
        self.interval = interval

    @classmethod
    def from_config(
        cls, cfg: HealthCheckConfig, state: HealthState = HealthState.UNKNOWN
    ) -> TargetHealth:
        return cls(
            rise=cfg.rise,
            fall=cfg.fall,
            interval=cfg.interval,
            max_interval=cfg.max_interval,
            state=state,
        )

    def record(self, ok: bool) -> Transition | None:
        """Count one check; returns the transition when the state changed."""
        old = self.state
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if old is not HealthState.UP and self.successes >= self.rise:
                self.state = HealthState.UP
        else:
            self.successes, self.failures = 0, self.failures + 1
            if old is not HealthState.DOWN and self.failures >= self.fall:
                self.state = HealthState.DOWN
        changed = self.state is not old
        if ok and not changed:
            self.interval = min(self.interval * ADAPTIVE_FACTOR, self.max_interval)
        else:
            self.interval = self.base_interval
        return Transition(old, self.state) if changed else None

    def adopt(self, state: HealthState) -> None:
        """Take a state set elsewhere (passive health, a reload) and count afresh from it."""
        self.state = state
        self.successes = self.failures = 0
        self.interval = self.base_interval

    def next_wait(self, unit_random: float) -> float:
        """The jittered wait: `interval` * (1 ± JITTER), `unit_random` uniform in [0, 1)."""
        return self.interval * (1 - JITTER + 2 * JITTER * unit_random)


# --- the monitor ------------------------------------------------------------------------------


class HealthMonitor:
    """Runs the checks of every target of every listener, one task per target.

    The tasks are held here (strong references) and cancelled by `stop`/`close`; they never
    raise: a check reports failures as results, and a faulty callback is logged.
    """

    def __init__(
        self,
        *,
        on_protocol_error: ProtocolErrorCallback | None = None,
        on_state_change: StateChangeCallback | None = None,
        check: Callable[..., Awaitable[CheckResult]] = run_check,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        unit_random: Callable[[], float] = random.random,
    ) -> None:
        self._on_protocol_error = on_protocol_error
        self._on_state_change = on_state_change
        # Injected so tests can drive the schedule without real time passing.
        self._check = check
        self._sleep = sleep
        self._monotonic = monotonic
        self._random = unit_random
        self._tasks: dict[str, set[asyncio.Task[None]]] = {}
        self._stopping: set[asyncio.Task[None]] = set()  # cancelled, not yet finished

    def running(self, listener: str) -> bool:
        return bool(self._tasks.get(listener))

    def statistics(self) -> MonitorStats:
        """The check tasks now; the targets' own figures are `Target.statistics()`."""
        return MonitorStats(
            {name: len(tasks) for name, tasks in self._tasks.items() if tasks},
            len(self._stopping),
        )

    def start(self, listener: str, cfg: HealthCheckConfig, targets: list[Target]) -> None:
        """(Re)start checking `targets`; with checks disabled, the targets return to UNKNOWN."""
        self.stop(listener)
        if not cfg.enabled:
            for target in targets:  # a stale DOWN would otherwise keep the target unusable
                target.consecutive_failures = 0
                if target.ejected_until is None:  # passive health brings an ejected one back
                    self._set_state(
                        listener, target, HealthState.UNKNOWN, "health checks disabled", "config"
                    )
            return
        loop = asyncio.get_running_loop()
        tasks = self._tasks[listener] = set()
        for target in targets:
            task = loop.create_task(
                self._watch(listener, cfg, target), name=f"health {listener} {target.label}"
            )
            tasks.add(task)
            task.add_done_callback(self._finished)

    def stop(self, listener: str) -> None:
        """Cancel the checks of `listener` (a no-op when none run)."""
        for task in self._tasks.pop(listener, set()):
            task.cancel()
            self._stopping.add(task)

    async def close(self) -> None:
        """Cancel every check and wait until all tasks have finished."""
        for listener in list(self._tasks):
            self.stop(listener)
        pending = list(self._stopping)
        if pending:
            await asyncio.wait(pending)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._stopping.discard(task)
        for tasks in self._tasks.values():
            tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("health_check_crashed", task=task.get_name(), exc_info=task.exception())

    async def _watch(self, listener: str, cfg: HealthCheckConfig, target: Target) -> None:
        machine = TargetHealth.from_config(cfg, target.state)
        while True:
            started = self._monotonic()
            result = await self._check(
                target.address, cfg, on_protocol_error=self._on_protocol_error
            )
            self._record(listener, target, machine, result)
            wait = machine.next_wait(self._random())
            await self._sleep(max(0.0, started + wait - self._monotonic()))

    def _record(
        self, listener: str, target: Target, machine: TargetHealth, result: CheckResult
    ) -> None:
        if machine.state is not target.state:  # passive health changed it: judge from there
            machine.adopt(target.state)
        transition = machine.record(result.ok)
        target.checks["success" if result.ok else "failure"] += 1
        target.check_duration.observe(result.latency_s)
        target.last_check = time.time()
        # A failed check has no meaningful latency (a timeout would read as a slow answer).
        target.latency_ms = round(result.latency_s * 1000, 3) if result.ok else None
        target.consecutive_failures = machine.failures
        # An ejected target stays DOWN until passive health returns it (SPEC section 10).
        if transition is not None and target.ejected_until is None:
            self._set_state(listener, target, transition.new, result.detail)

    def _set_state(
        self,
        listener: str,
        target: Target,
        new: HealthState,
        detail: str,
        cause: str = "active_check",
    ) -> None:
        change_state(
            listener, target, new, cause=cause, detail=detail, on_change=self._on_state_change
        )
