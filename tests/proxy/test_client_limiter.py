"""ClientLimiter on a fake clock: the client key, exact per-key counts, the token bucket and
the memory it keeps (SPEC section 12)."""

from __future__ import annotations

import pytest

from connwatch.config import ClientLimitsConfig
from connwatch.proxy.client_limits import CONNECTION_RATE, MAX_CONNECTIONS, ClientLimiter


def limiter(open_keys: list[str] | None = None, **limits: object) -> ClientLimiter:
    """A limiter whose listener's open connections have the keys `open_keys` (a list the test
    keeps up to date, as the tracker's live connections are)."""
    keys = [] if open_keys is None else open_keys
    return ClientLimiter(ClientLimitsConfig.model_validate(limits), lambda: iter(keys))


@pytest.mark.parametrize(
    ("limits", "peer", "key"),
    [
        ({}, ("127.0.1.5", 4000), "127.0.1.5"),
        ({"ipv4_prefix": 24}, ("127.0.1.5", 4000), "127.0.1.0/24"),
        ({"ipv4_prefix": 24}, ("127.0.1.9", 4001), "127.0.1.0/24"),
        ({"ipv4_prefix": 0}, ("10.1.2.3", 1), "0.0.0.0/0"),
        ({}, ("2001:db8::7", 1, 0, 0), "2001:db8::7"),
        ({"ipv6_prefix": 64}, ("2001:db8::7", 1, 0, 0), "2001:db8::/64"),
        ({"ipv4_prefix": 24}, ("::ffff:127.0.1.5", 1, 0, 0), "127.0.1.0/24"),
        ({}, ("::ffff:127.0.1.5", 1, 0, 0), "127.0.1.5"),
        ({}, "", "unix"),
    ],
)
def test_client_key(limits: dict[str, object], peer: object, key: str) -> None:
    assert limiter(**limits).key_of(peer) == key
    # admit_peer (a new connection's one call) keys and counts as key_of + admit do.
    for extra, second in (({}, None), ({"max_connections": 1}, MAX_CONNECTIONS)):
        opened: list[str] = []
        lim = limiter(opened, **limits, **extra)
        for want in (None, second):
            admitted, over = lim.admit_peer(peer, 0.0)
            assert (admitted, over) == (key, want)
            if over is None:
                opened.append(admitted)
        assert lim.active == {key: len(opened)}


def test_max_connections_is_exact_per_key_and_drops_keys_at_zero() -> None:
    lim = limiter(max_connections=2)
    assert lim.admit("a", 0.0) is None
    assert lim.admit("a", 0.0) is None
    assert lim.admit("a", 0.0) == MAX_CONNECTIONS
    assert lim.admit("b", 0.0) is None
    lim.release("a")
    assert lim.admit("a", 0.0) is None
    for _ in range(2):
        lim.release("a")
    lim.release("b")
    assert lim.active == {}, "a key's count is dropped when it reaches zero"


def test_token_bucket_gives_the_burst_then_the_rate() -> None:
    lim = limiter(connection_rate=20)
    admitted = sum(lim.admit("a", i * 0.01) is None for i in range(100))  # 100 in 0.99 s
    for _ in range(admitted):
        lim.release("a")
    assert 20 + 19 <= admitted <= 20 + 20  # the burst plus 20 per second
    assert lim.admit("b", 0.99) is None, "another client has its own bucket"
    assert lim.admit("a", 0.99) == CONNECTION_RATE


def test_a_fractional_rate_still_admits_one() -> None:
    lim = limiter(connection_rate=0.5)
    assert lim.admit("a", 0.0) is None
    assert lim.admit("a", 1.0) == CONNECTION_RATE
    assert lim.admit("a", 2.1) is None


def test_refilled_buckets_are_dropped_so_memory_follows_recent_clients() -> None:
    lim = limiter(connection_rate=10)
    for i in range(5000):
        assert lim.admit(f"10.0.{i // 250}.{i % 250}", i * 0.01) is None
        lim.release(f"10.0.{i // 250}.{i % 250}")
    # Only clients seen within burst/rate = 1 s can hold a bucket (100 at this pace), plus the
    # ones added since the last sweep (at most double the live ones, or 1024).
    assert lim.buckets <= 1024 + 100
    assert lim.active == {}


def test_no_open_counts_are_kept_without_max_connections() -> None:
    lim = limiter(connection_rate=100)
    assert lim.admit("a", 0.0) is None
    assert not lim.counting
    assert lim.active == {}, "no open connection is listed: nothing counted"


def test_reload_that_sets_max_connections_counts_the_open_connections() -> None:
    opened: list[str] = []
    lim = limiter(opened)
    for _ in range(3):
        assert lim.admit("a", 0.0) is None
        opened.append("a")
    assert lim.active == {"a": 3}  # counted when asked
    lim.configure(ClientLimitsConfig(max_connections=2))  # the 3 open count against it
    assert lim.counting
    assert lim.admit("a", 0.0) == MAX_CONNECTIONS
    lim.release("a")
    assert lim.admit("a", 0.0) == MAX_CONNECTIONS, "2 still open"
    lim.release("a")
    assert lim.admit("a", 0.0) is None
    assert lim.active == {"a": 2}
    lim.configure(ClientLimitsConfig())  # no cap: counts dropped, counted when asked again
    assert not lim.counting
    assert lim.active == {"a": 3}


def test_an_admission_out_of_time_order_does_not_take_tokens_back() -> None:
    lim = limiter(connection_rate=2)  # burst 2
    assert lim.admit("a", 10.0) is None  # one token left
    # Accepted earlier, its PROXY header read later: the token left is still there.
    assert lim.admit("a", 9.5) is None
    assert lim.admit("a", 10.0) == CONNECTION_RATE
    assert lim.admit("a", 10.5) is None, "one token refilled in the 0.5 s since 10.0"
