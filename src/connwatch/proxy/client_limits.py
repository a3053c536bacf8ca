"""Per-client-key limits of one listener (SPEC section 12): the client key, exact open-connection
counts per key and a token bucket per key for `connection_rate`.

Exact for every key, not only the busiest: memory follows the clients that are connected now
(a key's count is dropped when it reaches zero) and those that connected within the last
burst/rate seconds (a bucket that has refilled is as good as none, so it is dropped). One
`admit()` and one `release()` per connection: a few dict operations and int/float arithmetic.
The open counts are kept only while `max_connections` is set (the only limit that reads them):
otherwise they are counted from the listener's open connections when asked (`active`, at request
time) or when a reload sets the limit (it applies to the connections already open too).

With `workers: N` each worker process holds its own limiter, so the limits are per worker: see
docs/clients.md for why and what it means.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from sys import intern
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connwatch.config import ClientLimitsConfig

MAX_CONNECTIONS = "max_connections"  # the `limit` label of connwatch_client_limit_rejections_total
CONNECTION_RATE = "connection_rate"
LIMITS = (MAX_CONNECTIONS, CONNECTION_RATE)
UNIX_CLIENT = "unix"  # the one key of every client of a Unix-socket listener
_MAPPED = "::ffff:"  # IPv4-mapped IPv6 (a dual-stack listener): keyed as the IPv4 address
_SWEEP_MIN = 1024  # buckets held before the first sweep of refilled ones


class ClientLimiter:
    """The client key, open connections per key and the rate buckets of one listener."""

    __slots__ = (
        "_active",
        "_buckets",
        "_next_sweep",
        "_open_keys",
        "burst",
        "counting",
        "max_connections",
        "rate",
        "v4_prefix",
        "v6_prefix",
    )

    def __init__(
        self, config: ClientLimitsConfig, open_keys: Callable[[], Iterable[str | None]] = tuple
    ) -> None:
        # The client keys of the listener's open connections (None: not admitted yet).
        self._open_keys = open_keys
        # key -> connections admitted and not yet closed, while `max_connections` is set.
        self._active: dict[str, int] = {}
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, monotonic time of update]
        self._next_sweep = _SWEEP_MIN
        self.max_connections = 0
        self.counting = False
        self.rate = 0.0
        self.burst = 0.0
        self.v4_prefix = 32
        self.v6_prefix = 128
        self.configure(config)

    def configure(self, config: ClientLimitsConfig) -> None:
        """New limits for new connections (a reload); open connections keep their slots."""
        if config.max_connections and not self.max_connections:
            self._active = self._count()  # a cap on open connections counts those open now
        elif not config.max_connections:
            self._active = {}
        self.max_connections = config.max_connections
        # Whether `release` has work to do (open counts are kept): a plain slot, read as each
        # connection closes (a property would be a Python call there).
        self.counting = config.max_connections > 0
        self.rate = float(config.connection_rate)
        self.burst = max(self.rate, 1.0)
        if (config.ipv4_prefix, config.ipv6_prefix) != (self.v4_prefix, self.v6_prefix):
            self._buckets.clear()  # keys change meaning; counts of open ones stay with their key
        self.v4_prefix = config.ipv4_prefix
        self.v6_prefix = config.ipv6_prefix
        if not self.rate:
            self._buckets.clear()

    def _count(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for key in self._open_keys():
            if key is not None:
                counts[key] = counts.get(key, 0) + 1
        return counts

    @property
    def active(self) -> dict[str, int]:
        """Open connections per key (exact): kept, or counted now."""
        return self._active.copy() if self.max_connections else self._count()

    # -- the key --------------------------------------------------------------------------------
    def key_of(self, peer: Any) -> str:
        """The client key of a peer address (a socket address tuple, or a Unix path)."""
        if not isinstance(peer, tuple):
            return UNIX_CLIENT
        host: str = peer[0]
        if ":" in host:
            if host.startswith(_MAPPED) and "." in host:
                host = host[len(_MAPPED) :]
            elif self.v6_prefix == 128:
                return host
            else:
                return _network(host, self.v6_prefix)
        return host if self.v4_prefix == 32 else _network(host, self.v4_prefix)

    # -- admission ------------------------------------------------------------------------------
    def admit_peer(self, peer: Any, now: float) -> tuple[str, str | None]:
        """`key_of(peer)` and `admit(key, now)` in one call, as a new connection needs them:
        (key, the limit it is over or None). The usual cases inline: an IPv4 peer keyed by
        its address, no limit on (then there is nothing to count).

        The key is interned: each accepted socket's address brings its own copy of the host
        string, which the connection keeps (`client_key`) while it is open; interned, all the
        connections of one client share one (58 bytes a connection less)."""
        if type(peer) is tuple and self.v4_prefix == 32 and ":" not in (host := peer[0]):
            key: str = intern(host)
        else:
            key = intern(self.key_of(peer))
        if self.max_connections or self.rate:
            return key, self.admit(key, now)
        return key, None

    def admit(self, key: str, now: float) -> str | None:
        """Take a slot for a new connection of `key` at monotonic `now`; None when admitted,
        else the limit it is over (it takes no slot and no token then)."""
        active = self._active.get(key, 0)
        if self.max_connections and active >= self.max_connections:
            return MAX_CONNECTIONS
        if self.rate and not self._take_token(key, now):
            return CONNECTION_RATE
        if self.max_connections:
            self._active[key] = active + 1
        return None

    def release(self, key: str) -> None:
        """A connection admitted under `key` has closed (nothing to do unless `counting`)."""
        left = self._active.get(key, 0) - 1
        if left > 0:
            self._active[key] = left
        else:
            self._active.pop(key, None)

    def _take_token(self, key: str, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._next_sweep:
                self._sweep(now)
            self._buckets[key] = [self.burst - 1.0, now]
            return True
        tokens = bucket[0]
        if now > bucket[1]:  # PROXY headers may be read out of accept order: time only advances
            tokens = min(self.burst, tokens + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _sweep(self, now: float) -> None:
        """Drop the buckets that have refilled: a full bucket is the same as no bucket."""
        rate, burst = self.rate, self.burst
        full = [
            k for k, (tokens, at) in self._buckets.items() if tokens + (now - at) * rate >= burst
        ]
        for k in full:
            del self._buckets[k]
        self._next_sweep = max(_SWEEP_MIN, 2 * len(self._buckets))

    # -- reading --------------------------------------------------------------------------------
    @property
    def buckets(self) -> int:
        """Rate buckets held now (bounded by the clients seen within burst/rate seconds)."""
        return len(self._buckets)


def _network(host: str, prefix: int) -> str:
    """`127.0.1.9`, 24 -> `127.0.1.0/24`; a host that does not parse stays itself."""
    try:
        return str(ipaddress.ip_network((host.partition("%")[0], prefix), strict=False))
    except ValueError:
        return host
