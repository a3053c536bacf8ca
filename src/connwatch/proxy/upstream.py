"""Upstream targets of one listener: health state, balancing, connect with timeout and attempts."""

from __future__ import annotations

import asyncio
import itertools
import math
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

from connwatch._types import Address, Clock, HealthState
from connwatch.exceptions import (
    NO_FDS_ERRNOS,
    NoHealthyUpstreamError,
    UpstreamConnectError,
    describe_error,
)
from connwatch.histogram import LATENCY_BUCKETS, Histogram
from connwatch.proxy.connect_deadlines import FIRED, TASK, ConnectDeadlines
from connwatch.proxy.fd_watch import FdWatch
from connwatch.proxy.slow_start import admit, weight
from connwatch.proxy.sockopts import SocketOptions, apply_to_tcp_fd
from connwatch.snapshots import TargetStats

T = TypeVar("T")
NODELAY: SocketOptions = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
# A global, not `HealthState.DOWN` (an enum metaclass lookup, ~0.17 µs on 3.11): balancing reads
# it for every target on every connection.
_DOWN: Final = HealthState.DOWN


class Target:
    """One configured upstream address. Health checks write `state`; connections count `active`."""

    __slots__ = (
        "_state",
        "active",
        "address",
        "cause",
        "check_duration",
        "checks",
        "connect_duration",
        "connect_failures",
        "connecting",
        "consecutive_failures",
        "ejected_until",
        "ejections",
        "label",
        "last_check",
        "latency_ms",
        "recovered_at",
        "slow_credit",
    )

    def __init__(self, address: Address) -> None:
        self.address = address
        self.label = str(address)
        self._state = HealthState.UNKNOWN
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
        # Passive health and slow start (SPEC section 10): why the state last changed, the
        # wall-clock end of a passive ejection (None when not ejected), ejections so far (the
        # primary counts them), and when the target last left DOWN (monotonic, for slow start).
        self.cause = "config"
        self.ejected_until: float | None = None
        self.ejections = 0
        self.recovered_at = -math.inf
        self.slow_credit = 0.0

    @property
    def state(self) -> HealthState:
        return self._state

    @state.setter
    def state(self, new: HealthState) -> None:
        if self._state is HealthState.DOWN and new is not HealthState.DOWN:
            self.recovered_at = time.monotonic()  # slow start begins (proxy/slow_start.py)
            self.slow_credit = 0.0
        self._state = new

    @property
    def usable(self) -> bool:
        return self._state is not _DOWN

    def weight(self, slow_start: float, now: float | None = None) -> float:
        """The slow-start weight now: 0 while DOWN, else FLOOR..1 over the window."""
        if self._state is HealthState.DOWN:
            return 0.0
        if not slow_start:
            return 1.0
        return weight((time.monotonic() if now is None else now) - self.recovered_at, slow_start)

    def statistics(self, listener: str, slow_start: float = 0.0) -> TargetStats:
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
            cause=self.cause,
            ejected_until=self.ejected_until,
            weight=round(self.weight(slow_start), 3),
            ejections=self.ejections,
        )

    def __repr__(self) -> str:
        return f"<Target {self.label} {self.state} active={self.active}>"


class UpstreamPool:
    """Chooses targets in `balance` order among those not DOWN (UNKNOWN counts as usable)."""

    def __init__(
        self, addresses: tuple[Address, ...], balance: str, slow_start: float = 0.0
    ) -> None:
        self.targets = [Target(a) for a in addresses]
        self.balance = balance
        self.slow_start = slow_start  # seconds; 0 = off
        self.clock: Clock = time.monotonic  # slow start's clock (tests drive a fake one)
        # Passive health (proxy/passive_outcomes.py) is told of each failed connect: the label.
        self.on_connect_failure: Callable[[str], None] | None = None
        self._rr = itertools.count()
        self.deadlines = ConnectDeadlines()  # every try's connect_timeout, on one timer

    def by_label(self, label: str) -> Target | None:
        return next((t for t in self.targets if t.label == label), None)

    def candidates(self) -> list[Target]:
        targets = self.targets
        if len(targets) == 1:  # nothing to balance: no list comprehension, no property calls
            return [] if targets[0]._state is _DOWN else targets[:]
        usable = [t for t in targets if t.usable]
        if len(usable) <= 1:
            return usable
        if self.balance == "first":
            order = usable
        elif self.balance == "least_connections":
            # stable: ties keep config order
            order = sorted(usable, key=lambda t: t.active + t.connecting)
        else:
            start = next(self._rr) % len(usable)
            order = usable[start:] + usable[:start]
        if self.slow_start:
            return admit(order, self.clock(), self.slow_start)
        return order

    async def connect(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        *,
        timeout: float,
        attempts: int,
        options: SocketOptions = NODELAY,
        order: list[Target] | None = None,
        fds: FdWatch | None = None,
        task: asyncio.Task[Any] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[asyncio.Transport, Target]:
        """Connect a stream to the first target that answers, trying up to `attempts` targets in
        order, each try within `timeout` (as `reach`); `options` are set on a TCP socket, `fds`
        is shown its fd number (descriptors running short?).

        `reach` with the loop's connect inline: no opener coroutine and no partial made for
        every connection, one frame to resume at each step (~2k instructions a connection)."""
        if order is None:
            targets = self.targets
            if len(targets) != 1:
                order = self.candidates()
            elif targets[0]._state is not _DOWN:  # candidates()' own shortcut, without the call
                order = targets[:]
        if not order:
            raise NoHealthyUpstreamError("every upstream target is DOWN")
        if loop is None:
            loop = asyncio.get_running_loop()
        if task is None:
            task = asyncio.current_task()
            assert task is not None
        errors: list[str] = []
        out_of_fds = False
        deadlines = self.deadlines
        for target in itertools.islice(itertools.cycle(order), attempts):
            address = target.address
            started = time.monotonic()
            target.connecting += 1
            entry = deadlines.start(loop, started + timeout, task)
            try:
                try:
                    if address.path is not None:
                        transport, _ = await loop.create_unix_connection(
                            protocol_factory, address.path
                        )
                    else:
                        transport, _ = await loop.create_connection(
                            protocol_factory, address.host or "127.0.0.1", address.port
                        )
                except asyncio.CancelledError:
                    if entry[FIRED] and task.uncancel() == 0:
                        raise TimeoutError from None
                    raise
                finally:
                    entry[TASK] = None  # ended: the sweep lets it go
            except (OSError, TimeoutError) as exc:
                out_of_fds = self._failed(target, exc, errors) or out_of_fds
                continue
            finally:
                target.connecting -= 1
            if (sock := transport.get_extra_info("socket")) is not None:
                fd = sock.fileno()
                if options and address.path is None:  # TCP: its family need not be asked
                    apply_to_tcp_fd(fd, options)
                if fds is not None and not fds.low <= fd < fds.high:
                    fds.moved(fd)
            target.connect_duration.observe(time.monotonic() - started)
            return transport, target
        raise UpstreamConnectError("; ".join(errors), out_of_fds=out_of_fds)

    def _failed(self, target: Target, exc: OSError | TimeoutError, errors: list[str]) -> bool:
        """Count a failed try and note why; True when it failed for want of descriptors."""
        target.connect_failures += 1
        if self.on_connect_failure is not None:
            self.on_connect_failure(target.label)
        errors.append(f"{target.label}: {_describe(exc)}")
        return getattr(exc, "errno", None) in NO_FDS_ERRNOS

    async def reach(
        self,
        opener: Callable[[Address], Coroutine[Any, Any, T]],
        *,
        timeout: float,
        attempts: int,
        order: list[Target] | None = None,
        task: asyncio.Task[Any] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[T, Target]:
        """`opener(address)` on the targets in balance order until one succeeds, each try within
        `timeout`, at most `attempts` tries; counts failures, durations and connects in flight.
        Data paths differ only in their opener (a transport here, a raw socket for splice).
        `order`: candidates() already taken (a warm pool's miss), so balancing advances once.
        `task`: the task this runs in, when the caller holds it (asking costs a Python call);
        `loop`: the running loop, when the caller holds it (asking costs a getpid() on 3.11)."""
        if order is None:
            order = self.candidates()
        if not order:
            raise NoHealthyUpstreamError("every upstream target is DOWN")
        errors: list[str] = []
        out_of_fds = False
        if loop is None:
            loop = asyncio.get_running_loop()
        if task is None:
            task = asyncio.current_task()
            assert task is not None
        deadlines = self.deadlines
        for target in itertools.islice(itertools.cycle(order), attempts):
            started = time.monotonic()
            target.connecting += 1
            # Each try bounded by `timeout`: one timer for the pool's tries, not one each
            # (proxy/connect_deadlines.py), inline rather than a coroutine around the opener.
            entry = deadlines.start(loop, started + timeout, task)
            try:
                try:
                    opened = await opener(target.address)
                except asyncio.CancelledError:
                    if entry[FIRED] and task.uncancel() == 0:
                        raise TimeoutError from None
                    raise
                finally:
                    entry[TASK] = None  # ended: the sweep lets it go
            except (OSError, TimeoutError) as exc:
                out_of_fds = self._failed(target, exc, errors) or out_of_fds
                continue
            finally:
                target.connecting -= 1
            target.connect_duration.observe(time.monotonic() - started)
            return opened, target
        raise UpstreamConnectError("; ".join(errors), out_of_fds=out_of_fds)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not getattr(exc, "errno", None):
        return "connect timed out"
    return describe_error(exc)
