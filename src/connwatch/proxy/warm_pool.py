"""WarmPool: a listener's warm upstream connections, checked before use (SPEC section 9).

Not to be confused with `upstream.UpstreamPool`, the listener's set of targets and its balancer.

Per target, plain connected sockets wait here, owned by no transport, until a client takes one:
`take()` checks it (pooled_check) and hands it over, or counts a miss so that the listener
connects as without a pool. Bytes the upstream sent meanwhile (a greeting) stay in the kernel's
receive queue, so the transport that wraps the socket reads them first and counts them as the
connection's `upstream_to_client` bytes. One scan task per pool checks every idle socket on an
adaptive interval, retires old ones, probes, empties the pools of DOWN targets and refills.
Sockets are never counted as client connections; their connects are the target's connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

import structlog

from connwatch.proxy import pooled_check
from connwatch.proxy.pooled_check import (
    MAX_IDLE_AGE,
    SHUTDOWN,
    TARGET_DOWN,
    UNEXPECTED_DATA,
    check_socket,
    pending_bytes,
)
from connwatch.snapshots import PoolStats

if TYPE_CHECKING:
    from connwatch._types import Address
    from connwatch.config import UpstreamPoolConfig
    from connwatch.proxy.upstream import Target

log = structlog.get_logger("connwatch.pool")

Opener = Callable[["Address"], Coroutine[Any, Any, socket.socket]]
_DEMAND_WINDOW = 1.0  # seconds: `grow` keeps ready as many as were taken in the last one
# After a borrow the refill waits this long: the borrowing client's first exchange goes first,
# not behind a connect on the same loop (on loopback that connect costs it ~0.15 ms at p50).
_REFILL_DELAY = 0.005


class _Pooled:
    """One idle socket: when it was connected, and what was waiting at its first scan."""

    __slots__ = ("born", "seen", "sock")

    def __init__(self, sock: socket.socket, born: float) -> None:
        self.sock = sock
        self.born = born
        self.seen = -1  # bytes waiting at the first scan (a greeting); -1 before it


class TargetWarm:
    """The idle sockets and counts of one target."""

    __slots__ = (
        "_window_count",
        "_window_start",
        "connecting",
        "evictions",
        "hits",
        "idle",
        "last_window",
        "misses",
        "refill_timer",
        "target",
    )

    def __init__(self, target: Target) -> None:
        self.target = target
        self.idle: deque[_Pooled] = deque()
        self.connecting = 0
        self.hits = 0
        self.misses = 0
        self.evictions: Counter[str] = Counter()
        self._window_start = 0.0
        self._window_count = 0
        self.last_window = 0  # borrows in the last full window
        self.refill_timer: asyncio.TimerHandle | None = None

    def note_demand(self, now: float) -> None:
        if now - self._window_start >= _DEMAND_WINDOW:
            expired = now - self._window_start >= 2 * _DEMAND_WINDOW
            self.last_window = 0 if expired else self._window_count
            self._window_start = now
            self._window_count = 0
        self._window_count += 1

    def demand(self, now: float) -> int:
        if now - self._window_start >= 2 * _DEMAND_WINDOW:
            return 0
        if now - self._window_start >= _DEMAND_WINDOW:
            return self._window_count
        return max(self.last_window, self._window_count)

    def statistics(self) -> PoolStats:
        return PoolStats(len(self.idle), self.hits, self.misses, dict(self.evictions))


class WarmPool:
    """Warm sockets for every target of one listener."""

    def __init__(
        self,
        listener: str,
        config: UpstreamPoolConfig,
        *,
        opener: Opener,
        connect_timeout: float,
        probe_timeout: float,
    ) -> None:
        self.listener = listener
        self.config = config
        self.opener = opener
        self.connect_timeout = connect_timeout
        self.probe_timeout = probe_timeout
        self._targets: dict[str, TargetWarm] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scan_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self.scans = 0  # full scans done, for tests and debugging
        self.closed = False
        self._log = log.bind(listener=listener)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, targets: Iterable[Target]) -> None:
        """Begin keeping sockets for `targets` (on the running loop): fill now, then scan."""
        self.set_targets(targets)
        self._wake = asyncio.Event()
        self._scan_task = asyncio.get_running_loop().create_task(self._scan_loop())
        for tw in self._targets.values():
            self._refill(tw)

    def set_targets(self, targets: Iterable[Target]) -> None:
        """A reload's target list: new targets get a pool, removed ones have theirs closed."""
        wanted = {t.label: t for t in targets}
        for label in list(self._targets):
            if label not in wanted:
                tw = self._targets.pop(label)
                if tw.refill_timer is not None:
                    tw.refill_timer.cancel()
                    tw.refill_timer = None
                self._evict_all(tw, SHUTDOWN)
        for label, target in wanted.items():
            known = self._targets.get(label)
            if known is not None:
                known.target = target
                continue
            self._targets[label] = fresh = TargetWarm(target)
            if self._scan_task is not None:
                self._refill(fresh)

    def reconfigure(self, config: UpstreamPoolConfig, targets: Iterable[Target]) -> None:
        """New pool settings (reload): they apply from the next scan, which comes now."""
        self.config = config
        self.set_targets(targets)
        if self._wake is not None:
            self._wake.set()

    def set_timeouts(self, *, connect_timeout: float, probe_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.probe_timeout = probe_timeout

    def close(self) -> None:
        """Close every pooled socket at once (`shutdown`) and stop scanning and connecting."""
        self.closed = True
        if self._scan_task is not None:
            self._scan_task.cancel()
            self._scan_task = None
        for task in list(self._tasks):
            task.cancel()
        for tw in self._targets.values():
            if tw.refill_timer is not None:
                tw.refill_timer.cancel()
                tw.refill_timer = None
            self._evict_all(tw, SHUTDOWN)

    # -- lending --------------------------------------------------------------------------------
    def take(self, target: Target) -> socket.socket | None:
        """A checked socket to `target` (a hit), or None (a miss: connect as without a pool).

        Sockets that fail the check are evicted and the next is tried; the pool is refilled
        in the background either way."""
        tw = self._targets.get(target.label)
        if tw is None or self.closed:
            return None
        tw.note_demand(time.monotonic())
        checked = self.config.validation != "none"
        sock = None
        while tw.idle:
            pooled = tw.idle.pop()  # the oldest: its greeting has come; the check finds the dead
            reason = check_socket(pooled.sock) if checked else None
            if reason is None:
                sock = pooled.sock
                break
            self._evict(tw, pooled, reason)
        if sock is None:
            tw.misses += 1
        else:
            tw.hits += 1
        if tw.refill_timer is None:
            loop = asyncio.get_running_loop()
            tw.refill_timer = loop.call_later(_REFILL_DELAY, self._refill_later, tw)
        return sock

    def _refill_later(self, tw: TargetWarm) -> None:
        tw.refill_timer = None
        self._refill(tw)

    def target_changed(self, target: Target) -> None:
        """A target's health changed: DOWN empties its pool at once, back up refills it."""
        tw = self._targets.get(target.label)
        if tw is None or self.closed:
            return
        if not target.usable:
            self._evict_all(tw, TARGET_DOWN)
        else:
            self._refill(tw)

    def statistics(self, label: str) -> PoolStats | None:
        tw = self._targets.get(label)
        return None if tw is None else tw.statistics()

    # -- filling --------------------------------------------------------------------------------
    def wanted(self, tw: TargetWarm) -> int:
        cfg = self.config
        if not cfg.grow:
            return cfg.min_idle
        return max(cfg.min_idle, min(cfg.max_idle, tw.demand(time.monotonic())))

    def _refill(self, tw: TargetWarm) -> None:
        if self.closed or not tw.target.usable:
            return
        missing = self.wanted(tw) - len(tw.idle) - tw.connecting
        for _ in range(max(missing, 0)):
            tw.connecting += 1
            self._spawn(self._connect_one(tw))

    async def _connect_one(self, tw: TargetWarm) -> None:
        target = tw.target
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.connect_timeout):
                sock = await self.opener(target.address)
        except (OSError, TimeoutError) as exc:
            target.connect_failures += 1
            self._log.debug("pool_connect_failed", upstream=target.label, error=str(exc))
            return  # the next scan tries again: a failing target is not hammered
        finally:
            tw.connecting -= 1
        now = time.monotonic()
        target.connect_duration.observe(now - started)
        if self.closed or self._targets.get(target.label) is not tw or not target.usable:
            sock.close()
            return
        tw.idle.appendleft(_Pooled(sock, now))  # newest at the left: take() lends the oldest

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- evicting -------------------------------------------------------------------------------
    def _evict(self, tw: TargetWarm, pooled: _Pooled, reason: str) -> None:
        tw.evictions[reason] += 1
        with contextlib.suppress(OSError):
            pooled.sock.close()
        self._log.debug("pool_evicted", upstream=tw.target.label, reason=reason)

    def _evict_all(self, tw: TargetWarm, reason: str) -> None:
        while tw.idle:
            self._evict(tw, tw.idle.pop(), reason)

    # -- scanning -------------------------------------------------------------------------------
    async def _scan_loop(self) -> None:
        assert self._wake is not None
        interval = self.config.scan_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                evicted = await self.scan()
            except Exception:  # a bug must not end scanning for good; cancellation passes
                self._log.exception("pool_scan_failed")
                evicted = 0
            cfg = self.config
            if evicted:
                interval = cfg.scan_interval
            else:
                interval = min(max(interval, cfg.scan_interval) * 1.5, cfg.scan_max_interval)

    async def scan(self) -> int:
        """Check every idle socket, retire the old, probe, refill; the number evicted."""
        evicted = 0
        probing: list[tuple[TargetWarm, _Pooled]] = []
        now = time.monotonic()
        cfg = self.config
        for tw in list(self._targets.values()):
            if not tw.target.usable:
                evicted += len(tw.idle)
                self._evict_all(tw, TARGET_DOWN)
                continue
            keep: deque[_Pooled] = deque()
            for pooled in tw.idle:
                reason = self._judge(pooled, now)
                if reason is not None:
                    self._evict(tw, pooled, reason)
                    evicted += 1
                elif cfg.validation == "probe":
                    probing.append((tw, pooled))  # out of the pool while probed: never lent
                else:
                    keep.append(pooled)
            tw.idle = keep
        if probing:
            try:
                verdicts = await asyncio.gather(
                    *(pooled_check.probe(p.sock, cfg.probe, self.probe_timeout) for _, p in probing)
                )
            except BaseException:
                # close() cancelled the scan: gather let every probe finish its cancellation
                # first, so no reader is left on these sockets when they close.
                for tw, pooled in probing:
                    self._evict(tw, pooled, SHUTDOWN)
                raise
            for (tw, pooled), reason in zip(probing, verdicts, strict=True):
                if (
                    reason is not None
                    or self.closed
                    or self._targets.get(tw.target.label) is not tw
                ):
                    self._evict(tw, pooled, reason or SHUTDOWN)
                    evicted += reason is not None
                elif not tw.target.usable:
                    self._evict(tw, pooled, TARGET_DOWN)
                else:
                    tw.idle.append(pooled)  # just proven alive: lent first
        self.scans += 1
        for tw in self._targets.values():
            self._refill(tw)
        return evicted

    def _judge(self, pooled: _Pooled, now: float) -> str | None:
        cfg = self.config
        if cfg.validation != "none":
            reason = check_socket(pooled.sock)
            if reason is not None:
                return reason
            if cfg.validation == "peek":
                waiting = pending_bytes(pooled.sock)
                if pooled.seen < 0:
                    # A greeting goes to the client that takes the socket. Its size is noted at
                    # the first scan that finds the socket at least a check timeout old (one
                    # sooner could see a greeting still on its way as unexpected data).
                    if now - pooled.born >= self.probe_timeout:
                        pooled.seen = waiting
                elif waiting > pooled.seen:
                    return UNEXPECTED_DATA
        if now - pooled.born >= cfg.max_idle_age:
            return MAX_IDLE_AGE
        return None
