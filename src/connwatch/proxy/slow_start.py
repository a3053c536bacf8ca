"""Slow start (SPEC section 10): a target that leaves DOWN takes a growing share of new connections.

A target that turns UP, or returns from an ejection, has `recovered_at` (monotonic) set by its
state setter. For `slow_start` seconds from then its weight grows linearly from `FLOOR` to 1, and
it is admitted as the first choice for only that fraction of the connections it would otherwise
get: each time the balancer puts it first, it earns `weight` credit and takes the connection only
when the credit reaches 1, else it moves behind the others. That is deterministic and gives the
same "weight * normal share" under every balance mode (round_robin, least_connections, first),
because it only ever declines a choice the mode already made.

Off (`slow_start: 0`) it costs the balancer one attribute test per connection.
"""

from __future__ import annotations

from typing import Protocol, TypeVar


class Warming(Protocol):
    """What slow start reads and writes of a target (`proxy.upstream.Target`)."""

    recovered_at: float  # monotonic: when it last left DOWN
    slow_credit: float


T = TypeVar("T", bound=Warming)

FLOOR = 0.1  # the share a target starts at, as a fraction of its normal share


def weight(elapsed: float, window: float) -> float:
    """The slow-start weight `elapsed` seconds after recovery: FLOOR..1 over `window`."""
    if window <= 0 or elapsed >= window:
        return 1.0
    return FLOOR + (1.0 - FLOOR) * max(0.0, elapsed) / window


def admit(order: list[T], now: float, window: float) -> list[T]:
    """`order` with a first choice that is still warming up moved back unless its credit allows
    it this connection. Only targets put first are charged; the others keep their order."""
    for _ in range(len(order)):
        first = order[0]
        elapsed = now - first.recovered_at
        if elapsed >= window:
            return order
        first.slow_credit += weight(elapsed, window)
        if first.slow_credit >= 1.0:
            first.slow_credit -= 1.0
            return order
        order = [*order[1:], first]
    return order
