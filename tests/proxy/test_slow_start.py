"""Slow start in the balancer (SPEC section 10), with a fake clock: a target that leaves DOWN
takes a share of new connections growing linearly from 10% to 100% of its normal share."""

from __future__ import annotations

import pytest

from connwatch._types import Address, HealthState
from connwatch.proxy.slow_start import FLOOR, admit, weight
from connwatch.proxy.upstream import Target, UpstreamPool

WINDOW = 10.0
CONNECTIONS = 1000


def _pool(balance: str, targets: int, slow_start: float = WINDOW) -> UpstreamPool:
    addresses = tuple(Address("127.0.0.1", 7001 + i) for i in range(targets))
    return UpstreamPool(addresses, balance, slow_start)


def _recover(pool: UpstreamPool, target: Target, now: float) -> None:
    target.state = HealthState.DOWN
    target.state = HealthState.UP  # leaving DOWN starts slow start ...
    target.recovered_at = now  # ... on the fake clock


def _shares(pool: UpstreamPool, returning: Target) -> list[float]:
    """The returning target's share of each tenth of CONNECTIONS spread over the window."""
    clock = {"now": 100.0}
    pool.clock = lambda: clock["now"]
    _recover(pool, returning, clock["now"])
    start = clock["now"]
    picks = []
    for i in range(CONNECTIONS):
        clock["now"] = start + WINDOW * i / CONNECTIONS
        picks.append(pool.candidates()[0] is returning)  # short connections: active stays 0
    tenth = CONNECTIONS // 10
    return [sum(picks[k * tenth : (k + 1) * tenth]) / tenth for k in range(10)]


@pytest.mark.parametrize(
    ("balance", "targets", "normal"),
    [
        ("round_robin", 2, 1 / 2),
        ("round_robin", 3, 1 / 3),
        ("least_connections", 2, 1.0),  # idle ties keep config order: the first takes all
        ("first", 2, 1.0),
    ],
)
def test_share_grows_from_a_tenth_to_all_of_the_normal_share(
    balance: str, targets: int, normal: float
) -> None:
    pool = _pool(balance, targets)
    shares = _shares(pool, pool.targets[0])
    assert shares[0] < 0.3 * normal, shares
    assert shares[-1] > 0.8 * normal, shares
    assert shares[0] < shares[4] < shares[-1], shares  # grows through the window
    # after the window: the normal share again
    pool.clock = lambda: 100.0 + WINDOW + 1
    after = [pool.candidates()[0] is pool.targets[0] for _ in range(300)]
    assert sum(after) / len(after) == pytest.approx(normal, abs=0.01)


def test_the_others_take_what_the_returning_target_declines() -> None:
    pool = _pool("round_robin", 2)
    shares = _shares(pool, pool.targets[1])
    assert shares[0] < 0.15  # 0.5 normal share, weight ~0.15 in the first tenth
    assert pool.targets[0].usable


def test_off_leaves_the_balance_as_it_was() -> None:
    pool = _pool("round_robin", 2, slow_start=0.0)
    _recover(pool, pool.targets[0], 0.0)
    picks = [pool.candidates()[0].label for _ in range(10)]
    assert picks == [pool.targets[i % 2].label for i in range(10)]


def test_weight_is_linear_from_floor_to_one() -> None:
    assert weight(0.0, WINDOW) == pytest.approx(FLOOR)
    assert weight(WINDOW / 2, WINDOW) == pytest.approx(FLOOR + (1 - FLOOR) / 2)
    assert weight(WINDOW, WINDOW) == 1.0
    assert weight(5.0, 0.0) == 1.0


def test_target_weight_is_zero_while_down_and_one_without_slow_start() -> None:
    target = Target(Address("127.0.0.1", 7001))
    assert target.weight(WINDOW) == 1.0  # never DOWN: nothing to warm up
    target.state = HealthState.DOWN
    assert target.weight(WINDOW) == 0.0
    target.state = HealthState.UNKNOWN  # returned from an ejection
    assert target.weight(WINDOW, now=target.recovered_at) == pytest.approx(FLOOR)
    assert target.weight(0.0) == 1.0
    assert target.statistics("app", WINDOW).weight < 0.2


def test_only_leaving_down_starts_slow_start() -> None:
    target = Target(Address("127.0.0.1", 7001))
    target.state = HealthState.UP  # UNKNOWN -> UP at start: no slow start
    assert target.weight(WINDOW) == 1.0


def test_admit_with_every_target_warming_keeps_an_order() -> None:
    pool = _pool("round_robin", 2)
    for target in pool.targets:
        _recover(pool, target, 0.0)
    order = admit(list(pool.targets), 0.0, WINDOW)
    assert sorted(t.label for t in order) == sorted(t.label for t in pool.targets)
