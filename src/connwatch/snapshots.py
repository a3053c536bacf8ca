"""Frozen records of live state. The data plane produces them; metrics and admin read them.

They are plain data (ints, floats, strings, histograms) so that the snapshots of several worker
processes can be shipped to one admin endpoint and merged without double counting.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from connwatch._types import CloseReason, ConnectionState, HealthState
from connwatch.histogram import HistogramSnapshot


def _add(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _merge_hist(
    a: Mapping[str, HistogramSnapshot], b: Mapping[str, HistogramSnapshot]
) -> dict[str, HistogramSnapshot]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out[k].merged(v) if k in out else v
    return out


@dataclass(frozen=True, slots=True)
class ConnectionStats:
    """One connection as `MonitoredConnection.statistics(now)` saw it; `age` and `idle` are
    seconds as of that `now` (a closed connection's age stops at its close)."""

    id: str
    listener: str
    client: str
    upstream: str | None  # the target's label; None until an upstream is chosen
    state: ConnectionState
    reason: CloseReason | None  # final once CLOSED; before that the first explicit reason
    opened_wall: float  # wall-clock seconds
    age: float
    idle: float
    bytes_client_to_upstream: int
    bytes_upstream_to_client: int
    half_closed: bool


@dataclass(frozen=True, slots=True)
class ListenerSnapshot:
    """The state of one `Listener` object: its socket, admission and upstream targets.

    Connection counts are not here: the tracker keeps them per listener (`ListenerStats`)."""

    name: str
    bound: bool
    accepting: bool
    health_checks: bool  # whether active health checks are configured
    protocol_errors: dict[str, int]  # kind -> count
    targets: tuple[TargetStats, ...]  # in config order


@dataclass(frozen=True, slots=True)
class MonitorStats:
    """The health monitor's check tasks."""

    checking: dict[str, int]  # listener -> targets with a check task running
    stopping: int  # tasks cancelled and not yet finished


@dataclass(frozen=True, slots=True)
class ListenerStats:
    """Connection counts of one listener; bytes include what open connections moved so far."""

    name: str
    active: int
    accepted: int
    closed: dict[str, int]  # reason -> count
    bytes: dict[str, int]  # direction -> bytes
    flow_paused: dict[str, int]  # direction -> count
    duration: HistogramSnapshot
    upstream_active: dict[str, int] = field(default_factory=dict)  # target label -> open

    def merged(self, other: ListenerStats) -> ListenerStats:
        return ListenerStats(
            self.name,
            self.active + other.active,
            self.accepted + other.accepted,
            _add(self.closed, other.closed),
            _add(self.bytes, other.bytes),
            _add(self.flow_paused, other.flow_paused),
            self.duration.merged(other.duration),
            _add(self.upstream_active, other.upstream_active),
        )


@dataclass(frozen=True, slots=True)
class PoolStats:
    """One target's warm connection pool (SPEC section 9): idle now, borrows, evictions."""

    idle: int
    hits: int
    misses: int
    evictions: dict[str, int] = field(default_factory=dict)  # reason -> count

    def merged(self, other: PoolStats) -> PoolStats:
        return PoolStats(
            self.idle + other.idle,
            self.hits + other.hits,
            self.misses + other.misses,
            _add(self.evictions, other.evictions),
        )

    def to_wire(self) -> list[Any]:
        return [self.idle, self.hits, self.misses, self.evictions]

    @staticmethod
    def from_wire(raw: Any) -> PoolStats | None:
        return None if raw is None else PoolStats(raw[0], raw[1], raw[2], dict(raw[3]))


def _merge_pool(a: PoolStats | None, b: PoolStats | None) -> PoolStats | None:
    return b if a is None else (a if b is None else a.merged(b))


@dataclass(frozen=True, slots=True)
class TargetStats:
    """One upstream target of one listener: connects and active health checks."""

    listener: str
    label: str
    state: HealthState
    connect_failures: int
    connect_duration: HistogramSnapshot
    checks: dict[str, int] = field(default_factory=dict)  # result -> count
    check_duration: HistogramSnapshot | None = None
    last_check: float | None = None  # wall-clock seconds
    latency_ms: float | None = None
    consecutive_failures: int = 0
    # Passive health and slow start (SPEC section 10): decided by the primary, relayed to workers.
    cause: str = "config"  # of the last state change: active_check, passive, config
    ejected_until: float | None = None  # wall-clock end of a passive ejection
    weight: float = 1.0  # slow start, 0..1
    ejections: int = 0  # counted by the primary only
    pool: PoolStats | None = None  # None: no warm pool for this target (upstream_pool off)

    def merged(self, other: TargetStats) -> TargetStats:
        # Health checks run in one process only; connects happen in every worker.
        base = self if self.last_check is not None or other.last_check is None else other
        return TargetStats(
            self.listener,
            self.label,
            base.state,
            self.connect_failures + other.connect_failures,
            self.connect_duration.merged(other.connect_duration),
            base.checks,
            base.check_duration,
            base.last_check,
            base.latency_ms,
            base.consecutive_failures,
            cause=self.cause,  # the primary's (merged first); workers hold the relayed value
            ejected_until=self.ejected_until,
            weight=min(self.weight, other.weight),
            ejections=self.ejections + other.ejections,
            pool=_merge_pool(self.pool, other.pool),
        )


@dataclass(frozen=True, slots=True)
class LivenessStats:
    """Heartbeat results and TCP figures of one listener's connections."""

    listener: str
    heartbeats: dict[str, int]  # result (ok, failed) -> count
    rtt: dict[str, HistogramSnapshot]  # side -> histogram of RTT seconds
    retransmits: dict[str, int]  # side -> segments retransmitted
    states: dict[str, int]  # liveness state -> open connections now

    def merged(self, other: LivenessStats) -> LivenessStats:
        return LivenessStats(
            self.listener,
            _add(self.heartbeats, other.heartbeats),
            _merge_hist(self.rtt, other.rtt),
            _add(self.retransmits, other.retransmits),
            _add(self.states, other.states),
        )


@dataclass(frozen=True, slots=True)
class ClientStats:
    """The client view and client limits of one listener (SPEC section 12)."""

    listener: str
    tracked: int  # client keys held by the bounded summary (summed over workers: memory held)
    rejections: dict[str, int]  # limit -> connections closed with `client_limit`
    limits: dict[str, float] = field(default_factory=dict)  # configured; from the primary

    def merged(self, other: ClientStats) -> ClientStats:
        return ClientStats(
            self.listener,
            self.tracked + other.tracked,
            _add(self.rejections, other.rejections),
            self.limits or other.limits,
        )


@dataclass(frozen=True, slots=True)
class DaemonStats:
    """Everything /metrics shows, from one process or merged over workers."""

    listeners: dict[str, ListenerStats] = field(default_factory=dict)
    targets: dict[tuple[str, str], TargetStats] = field(default_factory=dict)
    liveness: dict[str, LivenessStats] = field(default_factory=dict)
    protocol_errors: dict[str, int] = field(default_factory=dict)  # kind -> count
    reloads: dict[str, int] = field(default_factory=dict)  # result -> count
    clients: dict[str, ClientStats] = field(default_factory=dict)  # listener -> client view

    def merged(self, other: DaemonStats) -> DaemonStats:
        return DaemonStats(
            _merge_by_key(self.listeners, other.listeners),
            _merge_by_key(self.targets, other.targets),
            _merge_by_key(self.liveness, other.liveness),
            _add(self.protocol_errors, other.protocol_errors),
            _add(self.reloads, other.reloads),
            clients=_merge_by_key(self.clients, other.clients),
        )

    @staticmethod
    def merge_all(parts: Iterable[DaemonStats]) -> DaemonStats:
        total = DaemonStats()
        for part in parts:
            total = total.merged(part)
        return total


K = TypeVar("K")
M = TypeVar("M", ListenerStats, TargetStats, LivenessStats, ClientStats)


def _merge_by_key(a: Mapping[K, M], b: Mapping[K, M]) -> dict[K, M]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out[k].merged(v) if k in out else v
    return out


# -- shipping snapshots between worker processes (JSON-safe dicts) --------------------------------
def _hist_out(h: HistogramSnapshot | None) -> Any:
    return None if h is None else [list(h.bounds), list(h.counts), h.total]


def _hist_in(raw: Any) -> HistogramSnapshot | None:
    if raw is None:
        return None
    bounds, counts, total = raw
    return HistogramSnapshot(tuple(bounds), tuple(counts), float(total))


def stats_to_wire(stats: DaemonStats) -> dict[str, Any]:
    return {
        "listeners": [
            [
                s.name,
                s.active,
                s.accepted,
                s.closed,
                s.bytes,
                s.flow_paused,
                _hist_out(s.duration),
                s.upstream_active,
            ]
            for s in stats.listeners.values()
        ],
        "targets": [
            [
                t.listener,
                t.label,
                str(t.state),
                t.connect_failures,
                _hist_out(t.connect_duration),
                t.checks,
                _hist_out(t.check_duration),
                t.last_check,
                t.latency_ms,
                t.consecutive_failures,
                [t.cause, t.ejected_until, t.weight, t.ejections],
                None if t.pool is None else t.pool.to_wire(),
            ]
            for t in stats.targets.values()
        ],
        "liveness": [
            [
                lv.listener,
                lv.heartbeats,
                {k: _hist_out(v) for k, v in lv.rtt.items()},
                lv.retransmits,
                lv.states,
            ]
            for lv in stats.liveness.values()
        ],
        "protocol_errors": stats.protocol_errors,
        "reloads": stats.reloads,
        "clients": [[c.listener, c.tracked, c.rejections] for c in stats.clients.values()],
    }


def stats_from_wire(raw: dict[str, Any]) -> DaemonStats:
    listeners = {}
    for name, active, accepted, closed, nbytes, paused, duration, up_active in raw["listeners"]:
        hist = _hist_in(duration)
        assert hist is not None
        listeners[name] = ListenerStats(
            name, active, accepted, closed, nbytes, paused, hist, up_active
        )
    targets = {}
    for row in raw["targets"]:
        listener, label, state, failures, connect, checks, check_dur, last, latency, cf = row[:10]
        cause, ejected_until, weight, ejections = (
            row[10] if len(row) > 10 else ("config", None, 1, 0)
        )
        pool = PoolStats.from_wire(row[11]) if len(row) > 11 else None
        connect_hist = _hist_in(connect)
        assert connect_hist is not None
        targets[(listener, label)] = TargetStats(
            listener,
            label,
            HealthState(state),
            failures,
            connect_hist,
            checks,
            _hist_in(check_dur),
            last,
            latency,
            cf,
            cause=cause,
            ejected_until=ejected_until,
            weight=weight,
            ejections=ejections,
            pool=pool,
        )
    liveness = {}
    for listener, beats, rtt, retrans, states in raw["liveness"]:
        hists = {k: h for k, v in rtt.items() if (h := _hist_in(v)) is not None}
        liveness[listener] = LivenessStats(listener, beats, hists, retrans, states)
    clients = {
        name: ClientStats(name, tracked, rejections)
        for name, tracked, rejections in raw.get("clients", [])
    }
    return DaemonStats(
        listeners, targets, liveness, raw["protocol_errors"], raw["reloads"], clients=clients
    )
