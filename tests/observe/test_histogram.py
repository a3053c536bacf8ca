"""Histogram buckets (connwatch.histogram): a value goes to the first bucket whose bound is >= it
(Prometheus `le`), the bounds given as ints or floats alike."""

from __future__ import annotations

from connwatch.histogram import DURATION_BUCKETS, Histogram


def test_values_fall_in_the_first_bucket_whose_bound_holds_them() -> None:
    h = Histogram(DURATION_BUCKETS)  # ints (1, 5, 10, ...) among floats
    values = [0.0, 0.005, 0.0050001, 0.9999, 1, 1.0, 1.0000001, 86_400, 86_400.5, 10**9]
    for v in values:
        h.observe(v)
    snap = h.snapshot()
    assert snap.bounds == DURATION_BUCKETS
    expected = [0] * (len(DURATION_BUCKETS) + 1)
    for v in values:
        expected[next((i for i, b in enumerate(DURATION_BUCKETS) if v <= b), -1)] += 1
    assert list(snap.counts) == expected
    assert snap.total == sum(values)
    assert [b for b, _ in snap.cumulative()][:6] == ["0.005", "0.01", "0.05", "0.1", "0.5", "1.0"]
