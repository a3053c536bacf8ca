"""Plain-int accumulators read at scrape time: cheap to update, mergeable across workers."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

# Seconds. Connection lifetimes run from milliseconds to days.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1,
    5,
    10,
    30,
    60,
    300,
    900,
    1800,
    3600,
    21600,
    86400,
)
# Seconds. Connect times, check latencies and TCP RTTs on a LAN or loopback.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    bounds: tuple[float, ...]
    counts: tuple[int, ...]  # per bucket (not cumulative); one more than bounds: the +Inf bucket
    total: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        acc = 0
        for bound, n in zip((*map(_fmt_bound, self.bounds), "+Inf"), self.counts, strict=True):
            acc += n
            out.append((bound, acc))
        return out

    def merged(self, other: HistogramSnapshot) -> HistogramSnapshot:
        counts = tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        return HistogramSnapshot(self.bounds, counts, self.total + other.total)


def _fmt_bound(bound: float) -> str:
    return repr(float(bound))


class Histogram:
    """A histogram as plain ints: `observe()` is a bisect and two additions, no lock."""

    __slots__ = ("_bounds", "_counts", "_floats", "_sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = tuple(bounds)
        # The bounds searched, all floats: a float compared with an int bound (1, 5, 10, ...)
        # takes CPython's slow mixed-type path, several times a bisect (twice a connection).
        self._floats = tuple(map(float, self._bounds))
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._floats, value)] += 1
        self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self._bounds, tuple(self._counts), self._sum)
