"""Upstream targets of one listener: health state, balancing, connect with timeout and attempts."""

from __future__ import annotations

import asyncio
import errno
import itertools
import socket
import time
from collections import Counter
from collections.abc import Callable

from connwatch._types import Address, HealthState
from connwatch.exceptions import NoHealthyUpstreamError, UpstreamConnectError
from connwatch.snapshots import TargetStats
from connwatch.stats import LATENCY_BUCKETS, Histogram

_NO_FDS = frozenset({errno.EMFILE, errno.ENFILE})


class Target:
    """One configured upstream address. Health checks write `state`; connections count `active`."""

    __slots__ = (
        "active",
        "address",
        "check_duration",
        "checks",
        "connect_duration",
        "connect_failures",
        "connecting",
        "consecutive_failures",
        "label",
        "last_check",
        "latency_ms",
        "state",
    )

    def __init__(self, address: Address) -> None:
        self.address = address
        self.label = str(address)
        self.state = HealthState.UNKNOWN
        self.active = 0
        self.connecting = 0  # connects in flight: least_connections counts them too
        self.connect_failures = 0
        self.connect_duration = Histogram(LATENCY_BUCKETS)
        # Written by the health checker of this target (health.py).
        self.checks: Counter[str] = Counter()
        self.check_duration = Histogram(LATENCY_BUCKETS)
        self.last_check: float | None = None  # wall clock
        self.latency_ms: float | None = None
        self.consecutive_failures = 0

    @property
    def usable(self) -> bool:
        return self.state is not HealthState.DOWN

    def statistics(self, listener: str) -> TargetStats:
        return TargetStats(
            listener,
            self.label,
            self.state,
            self.connect_failures,
            self.connect_duration.snapshot(),
            dict(self.checks),
            self.check_duration.snapshot(),
            self.last_check,
            self.latency_ms,
            self.consecutive_failures,
        )

    def __repr__(self) -> str:
        return f"<Target {self.label} {self.state} active={self.active}>"


class UpstreamPool:
    """Chooses targets in `balance` order among those not DOWN (UNKNOWN counts as usable)."""

    def __init__(self, addresses: tuple[Address, ...], balance: str) -> None:
        self.targets = [Target(a) for a in addresses]
        self.balance = balance
        self._rr = itertools.count()

    def by_label(self, label: str) -> Target | None:
        return next((t for t in self.targets if t.label == label), None)

    def candidates(self) -> list[Target]:
        usable = [t for t in self.targets if t.usable]
        if len(usable) <= 1 or self.balance == "first":
            return usable
        if self.balance == "least_connections":
            # stable: ties keep config order
            return sorted(usable, key=lambda t: t.active + t.connecting)
        start = next(self._rr) % len(usable)
        return usable[start:] + usable[:start]

    async def connect(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        *,
        timeout: float,
        attempts: int,
    ) -> tuple[asyncio.Transport, Target]:
        """Connect to the first target that answers, trying up to `attempts` targets in order."""
        order = self.candidates()
        if not order:
            raise NoHealthyUpstreamError("every upstream target is DOWN")
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        out_of_fds = False
        for target in itertools.islice(itertools.cycle(order), attempts):
            started = time.monotonic()
            target.connecting += 1
            try:
                async with asyncio.timeout(timeout):
                    transport = await open_transport(loop, protocol_factory, target.address)
            except (OSError, TimeoutError) as exc:
                out_of_fds = out_of_fds or getattr(exc, "errno", None) in _NO_FDS
                target.connect_failures += 1
                errors.append(f"{target.label}: {_describe(exc)}")
                continue
            finally:
                target.connecting -= 1
            target.connect_duration.observe(time.monotonic() - started)
            return transport, target
        raise UpstreamConnectError("; ".join(errors), out_of_fds=out_of_fds)


async def open_transport(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    address: Address,
) -> asyncio.Transport:
    """Open a stream to `address` (TCP or Unix socket) with TCP_NODELAY on TCP."""
    if address.path is not None:
        transport, _ = await loop.create_unix_connection(protocol_factory, address.path)
    else:
        transport, _ = await loop.create_connection(
            protocol_factory, address.host or "127.0.0.1", address.port
        )
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return transport


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not getattr(exc, "errno", None):
        return "connect timed out"
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
