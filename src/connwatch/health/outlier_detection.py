"""Passive health (SPEC section 10): eject targets that keep failing real client connections.

`OutlierDetector` is the `UpstreamOutcomes` sink of every listener with `outlier_detection`
enabled (in the primary; workers relay their outcomes to it, see runtime/outcome_relay.py). Per
target it counts consecutive failures; at `consecutive_failures` the target is ejected: `DOWN`
with cause `passive` for `base_ejection_time * 2^(n-1)` (n = its ejections so far, capped at
`max_ejection_time`; n returns to 0 after a full ejection time without a failure), unless more
than `max_ejection_percent` of the listener's targets would then be ejected (the refusal is
logged, throttled). When the time is up the target returns to `UNKNOWN`, from where active checks
(when on) decide; leaving `DOWN` also starts slow start (proxy/slow_start.py).

A state change goes through the same `on_state_change` hook as the active checks', so relaying to
workers and `on_upstream_down: close` apply to passive `DOWN` too. `Target.state` and
`Target.cause` are written only on this loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from connwatch._types import HealthState, Throttle
from connwatch.health.state_changes import StateChangeCallback, change_state
from connwatch.proxy.listener import Listener
from connwatch.proxy.upstream import Target

log = structlog.get_logger("connwatch.health")

PASSIVE = "passive"  # the `cause` of a state change made here


@dataclass(slots=True)
class _Record:
    """What passive health remembers of one target."""

    failures: int = 0  # consecutive, since the last success or ejection
    ejections: int = 0  # n: ejections in a row without a quiet period
    last_duration: float = 0.0  # seconds of the last ejection
    quiet_since: float = 0.0  # monotonic: the last failure or return from ejection
    handle: asyncio.TimerHandle | None = None  # the return from the current ejection


class OutlierDetector:
    """Counts outcomes per target and ejects; implements `_types.UpstreamOutcomes`."""

    def __init__(
        self,
        listeners: dict[str, Listener],
        *,
        on_state_change: StateChangeCallback | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._listeners = listeners  # the daemon's dict: a reload changes it in place
        self._on_state_change = on_state_change
        self._monotonic = monotonic
        self._wall = wall
        self._records: dict[tuple[str, str], _Record] = {}
        self._throttle = Throttle()

    # -- UpstreamOutcomes -----------------------------------------------------------------------
    def upstream_succeeded(self, listener: str, upstream: str) -> None:
        record = self._records.get((listener, upstream))
        if record is not None:
            record.failures = 0

    def upstream_failed(self, listener: str, upstream: str) -> None:
        owner = self._listeners.get(listener)
        target = owner.pool.by_label(upstream) if owner is not None else None
        if owner is None or target is None or not owner.config.outlier_detection.enabled:
            return
        cfg = owner.config.outlier_detection
        record = self._records.setdefault((listener, upstream), _Record())
        now = self._monotonic()
        if record.ejections and now - record.quiet_since >= record.last_duration:
            record.ejections = 0  # a full ejection time went by without a failure
        record.quiet_since = now
        if target.ejected_until is not None:
            return  # connections opened before the ejection, failing now: already counted for
        record.failures += 1
        if record.failures < cfg.consecutive_failures:
            return
        targets = owner.pool.targets
        ejected = sum(1 for t in targets if t.ejected_until is not None)
        if (ejected + 1) * 100 > cfg.max_ejection_percent * len(targets):
            key = f"{listener} {upstream}"
            if (suppressed := self._throttle.allow(key)) is not None:
                log.warning(
                    "upstream_ejection_refused",
                    listener=listener,
                    upstream=upstream,
                    failures=record.failures,
                    ejected=ejected,
                    targets=len(targets),
                    max_ejection_percent=cfg.max_ejection_percent,
                    suppressed=suppressed,
                )
            return
        self._eject(listener, owner, target, record)

    # -- ejection and return --------------------------------------------------------------------
    def _eject(self, listener: str, owner: Listener, target: Target, record: _Record) -> None:
        cfg = owner.config.outlier_detection
        record.ejections += 1
        duration = min(cfg.base_ejection_time * 2 ** (record.ejections - 1), cfg.max_ejection_time)
        failures, record.failures = record.failures, 0
        record.last_duration = duration
        target.ejected_until = self._wall() + duration
        target.ejections += 1
        log.warning(
            "upstream_ejected",
            listener=listener,
            upstream=target.label,
            failures=failures,
            ejection_s=round(duration, 3),
            ejections=record.ejections,
        )
        self._set_state(listener, target, HealthState.DOWN, f"{failures} failures in a row")
        if record.handle is not None:
            record.handle.cancel()
        record.handle = asyncio.get_running_loop().call_later(
            duration, self._return, listener, target.label
        )

    def _return(self, listener: str, upstream: str) -> None:
        record = self._records.get((listener, upstream))
        owner = self._listeners.get(listener)
        target = owner.pool.by_label(upstream) if owner is not None else None
        if record is not None:
            record.handle = None
            record.failures = 0
            record.quiet_since = self._monotonic()
        if target is None:
            self._records.pop((listener, upstream), None)
            return
        target.ejected_until = None
        self._set_state(listener, target, HealthState.UNKNOWN, "ejection time over")

    def _set_state(self, listener: str, target: Target, new: HealthState, detail: str) -> None:
        # Relayed to workers (with the ejection) even when the state was already DOWN.
        change_state(
            listener,
            target,
            new,
            cause=PASSIVE,
            detail=detail,
            on_change=self._on_state_change,
            notify_unchanged=True,
        )

    @property
    def enabled(self) -> bool:
        """Whether any listener has passive health on (workers' outcomes are worth fetching)."""
        return any(x.config.outlier_detection.enabled for x in self._listeners.values())

    # -- what admin and tests read --------------------------------------------------------------
    def failures(self, listener: str, upstream: str) -> int:
        record = self._records.get((listener, upstream))
        return record.failures if record is not None else 0

    def close(self) -> None:
        """Cancel every pending return (shutdown)."""
        for record in self._records.values():
            if record.handle is not None:
                record.handle.cancel()
                record.handle = None
