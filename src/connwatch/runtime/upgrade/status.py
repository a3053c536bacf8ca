"""What one process knows about upgrades: `connwatch_upgrades_total{role,result}` (its own
hand-overs and take-overs plus its predecessor's, so the counter never goes back across an
upgrade) and whether one is under way (for /healthz and `connwatch top`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

HANDED_OVER, TOOK_OVER = "handed_over", "took_over"
SUCCESS, FAILURE = "success", "failure"
ROLES = (HANDED_OVER, TOOK_OVER)
RESULTS = (SUCCESS, FAILURE)


class UpgradeStatus:
    """Counts and the phase of the current upgrade, shared by the handover and takeover sides."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.inherited: Counter[tuple[str, str]] = Counter()  # the predecessor's, at its end
        self.phase: str | None = None  # None, "taking_over", "draining_predecessor", "handing_over"
        self.peer_pid: int | None = None

    def count(self, role: str, result: str) -> None:
        self.counts[(role, result)] += 1

    def totals(self, predecessor: Counter[tuple[str, str]] | None = None) -> dict[str, int]:
        total = self.counts + self.inherited + (predecessor or Counter())
        return {f"{role}/{result}": total[(role, result)] for role in ROLES for result in RESULTS}

    def describe(self) -> dict[str, Any] | None:
        """The /healthz `upgrade` field: null when no upgrade is under way."""
        if self.phase is None:
            return None
        return {"state": self.phase, "peer_pid": self.peer_pid}


def counts_from_wire(raw: dict[str, int]) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for key, value in raw.items():
        role, _, result = key.partition("/")
        if role in ROLES and result in RESULTS:
            out[(role, result)] = int(value)
    return out


class UpgradesCollector(Collector):
    """`connwatch_upgrades_total`, read at scrape time."""

    def __init__(self, totals: Callable[[], dict[str, int]]) -> None:
        self._totals = totals

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "connwatch_upgrades",
            "Seamless upgrades (listener hand-overs), by role and result.",
            labels=["role", "result"],
        )
        totals = self._totals()
        for role in ROLES:
            for result in RESULTS:
                family.add_metric([role, result], totals.get(f"{role}/{result}", 0))
        yield family
