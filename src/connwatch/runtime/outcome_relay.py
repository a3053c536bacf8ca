"""Passive health with `workers` > 1: workers report client-connection outcomes to the primary.

The primary owns the decision (one `OutlierDetector`, so consecutive failures and the
`max_ejection_percent` budget are counted over all workers' connections, and an ejection is one
event). Each worker keeps an `OutcomeBuffer` (the `UpstreamOutcomes` its listeners report to);
the primary drains every worker's buffer over the control channel every `RELAY_INTERVAL` while a
listener has `outlier_detection` on, feeds the outcomes to its detector in order, and relays the
resulting state changes (`DOWN`/`UNKNOWN`, cause, `ejected_until`) back to every worker with the
`health` op, as it does for active checks. So a worker's failures count at most one interval
late, and every worker stops sending clients to an ejected target within one control round trip.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import structlog

from connwatch._types import Throttle
from connwatch.health.outlier_detection import OutlierDetector
from connwatch.runtime.worker_pool import WorkerPool

log = structlog.get_logger("connwatch.workers")

RELAY_INTERVAL = 0.1  # seconds between the primary's collections of workers' outcomes
_MAX_BUFFERED = 65536  # outcomes a worker holds between collections; older ones are dropped


class OutcomeBuffer:
    """A worker's `UpstreamOutcomes`: `[listener, upstream, ok]` rows until the primary asks."""

    def __init__(self, limit: int = _MAX_BUFFERED) -> None:
        self._rows: collections.deque[list[Any]] = collections.deque(maxlen=limit)

    def upstream_succeeded(self, listener: str, upstream: str) -> None:
        self._rows.append([listener, upstream, True])

    def upstream_failed(self, listener: str, upstream: str) -> None:
        self._rows.append([listener, upstream, False])

    def drain(self) -> list[list[Any]]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    @property
    def pending(self) -> int:
        return len(self._rows)


def feed(detector: OutlierDetector, rows: list[list[Any]]) -> None:
    """Give a worker's outcomes to the primary's detector, in the order they happened."""
    for listener, upstream, ok in rows:
        if ok:
            detector.upstream_succeeded(str(listener), str(upstream))
        else:
            detector.upstream_failed(str(listener), str(upstream))


async def relay_outcomes(
    pool: WorkerPool, detector: OutlierDetector, interval: float = RELAY_INTERVAL
) -> None:
    """The primary's loop: collect every worker's outcomes while passive health is on. A worker
    that does not answer (exited, or stopping) is skipped, with one warning per 10 s."""
    throttle = Throttle()
    while True:
        await asyncio.sleep(interval)
        if not pool.workers or not detector.enabled:
            continue
        for worker in list(pool.workers.values()):
            if worker.proc.returncode is not None:
                continue
            try:
                rows = await worker.channel.call("outcomes")
            except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
                if (suppressed := throttle.allow(f"outcomes {worker.index}")) is not None:
                    log.warning(
                        "worker_unreachable",
                        worker=worker.index,
                        op="outcomes",
                        error=repr(exc),
                        suppressed=suppressed,
                    )
                continue
            if rows:
                feed(detector, rows)
