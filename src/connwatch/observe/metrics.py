"""The metrics registry: families built fresh at each scrape from a `DaemonStats` snapshot.

Nothing on the data path calls prometheus_client; the collector reads plain ints when scraped.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

from connwatch import __version__
from connwatch._types import CloseReason, Direction, Liveness, Side
from connwatch.histogram import HistogramSnapshot
from connwatch.snapshots import DaemonStats

REASONS = [str(r) for r in CloseReason]
DIRECTIONS = [str(d) for d in Direction]
SIDES = [str(s) for s in Side]
LIVENESS_STATES = [str(s) for s in Liveness]
PROTOCOL_ERROR_KINDS = ["proxy_protocol", "heartbeat_frame"]
RESULTS = ["success", "failure"]
BEAT_RESULTS = ["ok", "failed"]
CLIENT_LIMITS = ["max_connections", "connection_rate"]  # `limit` of the client-limit rejections
LISTENER_LIMITS = ["max_connections", "client_max_connections", "client_connection_rate"]
POOL_EVICTION_REASONS = [
    "peer_closed",
    "peer_reset",
    "not_established",
    "probe_failed",
    "unexpected_data",
    "max_idle_age",
    "target_down",
    "shutdown",
]


def _hist(family: HistogramMetricFamily, labels: list[str], snap: HistogramSnapshot) -> None:
    family.add_metric(labels, buckets=snap.cumulative(), sum_value=snap.total)


class DaemonCollector(Collector):
    """Yields every connwatch_* family from one `DaemonStats` taken at scrape time."""

    def __init__(self, source: Callable[[], DaemonStats]) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on live config; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        stats = self._source()
        yield from self._connections(stats)
        yield from self._upstreams(stats)
        yield from self._ejections(stats)
        yield from self._liveness(stats)
        yield from self._warm_pools(stats)
        yield from self._daemon(stats)
        yield from self._clients(stats)

    def _connections(self, stats: DaemonStats) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "connwatch_connections_active", "Client connections open now.", labels=["listener"]
        )
        accepted = CounterMetricFamily(
            "connwatch_connections_accepted",
            "Client connections accepted (including those refused at once).",
            labels=["listener"],
        )
        closed = CounterMetricFamily(
            "connwatch_connections_closed",
            "Client connections closed, by reason.",
            labels=["listener", "reason"],
        )
        duration = HistogramMetricFamily(
            "connwatch_connection_duration_seconds",
            "Lifetime of closed client connections.",
            labels=["listener"],
        )
        nbytes = CounterMetricFamily(
            "connwatch_bytes",
            "Bytes forwarded, open connections included.",
            labels=["listener", "direction"],
        )
        paused = CounterMetricFamily(
            "connwatch_flow_paused",
            "Times reading paused because the other side's buffer was full.",
            labels=["listener", "direction"],
        )
        for name, ls in stats.listeners.items():
            active.add_metric([name], ls.active)
            accepted.add_metric([name], ls.accepted)
            for reason in REASONS:
                closed.add_metric([name, reason], ls.closed.get(reason, 0))
            _hist(duration, [name], ls.duration)
            for d in DIRECTIONS:
                nbytes.add_metric([name, d], ls.bytes.get(d, 0))
                paused.add_metric([name, d], ls.flow_paused.get(d, 0))
        yield from (active, accepted, closed, duration, nbytes, paused)

    def _upstreams(self, stats: DaemonStats) -> Iterator[Metric]:
        labels = ["listener", "upstream"]
        active = GaugeMetricFamily(
            "connwatch_upstream_connections_active",
            "Proxied connections open to each upstream target.",
            labels=labels,
        )
        connect = HistogramMetricFamily(
            "connwatch_upstream_connect_duration_seconds",
            "Time to connect to an upstream target.",
            labels=labels,
        )
        failures = CounterMetricFamily(
            "connwatch_upstream_connect_failures",
            "Failed connect attempts to an upstream target.",
            labels=labels,
        )
        up = GaugeMetricFamily(
            "connwatch_upstream_up",
            "0 when the target is DOWN; 1 when UP or UNKNOWN (checks off or no result yet).",
            labels=labels,
        )
        checks = CounterMetricFamily(
            "connwatch_health_checks",
            "Active health checks, by result.",
            labels=[*labels, "result"],
        )
        check_duration = HistogramMetricFamily(
            "connwatch_health_check_duration_seconds",
            "Duration of active health checks.",
            labels=labels,
        )
        for (listener, label), ts in stats.targets.items():
            key = [listener, label]
            ls = stats.listeners.get(listener)
            active.add_metric(key, ls.upstream_active.get(label, 0) if ls else 0)
            _hist(connect, key, ts.connect_duration)
            failures.add_metric(key, ts.connect_failures)
            up.add_metric(key, 0 if ts.state == "DOWN" else 1)
            for result in RESULTS:
                checks.add_metric([*key, result], ts.checks.get(result, 0))
            if ts.check_duration is not None:
                _hist(check_duration, key, ts.check_duration)
        yield from (active, connect, failures, up, checks, check_duration)

    def _ejections(self, stats: DaemonStats) -> Iterator[Metric]:
        """Passive health (SPEC section 10): every target has the series, from 0."""
        ejections = CounterMetricFamily(
            "connwatch_upstream_ejections",
            "Times passive health (outlier detection) ejected an upstream target.",
            labels=["listener", "upstream"],
        )
        for (listener, label), ts in sorted(stats.targets.items()):
            ejections.add_metric([listener, label], ts.ejections)
        yield ejections

    def _warm_pools(self, stats: DaemonStats) -> Iterator[Metric]:
        """SPEC section 9: only targets of listeners with `upstream_pool.enabled`."""
        labels = ["listener", "upstream"]
        idle = GaugeMetricFamily(
            "connwatch_upstream_pool_idle",
            "Warm upstream connections ready in the pool now.",
            labels=labels,
        )
        borrows = CounterMetricFamily(
            "connwatch_upstream_pool_borrows",
            "New client connections that took a pooled connection (hit) or found none (miss).",
            labels=[*labels, "result"],
        )
        evictions = CounterMetricFamily(
            "connwatch_upstream_pool_evictions",
            "Pooled connections closed before use, by reason.",
            labels=[*labels, "reason"],
        )
        for (listener, label), ts in stats.targets.items():
            pool = ts.pool
            if pool is None:
                continue
            key = [listener, label]
            idle.add_metric(key, pool.idle)
            borrows.add_metric([*key, "hit"], pool.hits)
            borrows.add_metric([*key, "miss"], pool.misses)
            for reason in POOL_EVICTION_REASONS:
                evictions.add_metric([*key, reason], pool.evictions.get(reason, 0))
        yield from (idle, borrows, evictions)

    def _liveness(self, stats: DaemonStats) -> Iterator[Metric]:
        beats = CounterMetricFamily(
            "connwatch_heartbeats",
            "Per-connection heartbeats, by result.",
            labels=["listener", "result"],
        )
        rtt = HistogramMetricFamily(
            "connwatch_tcp_rtt_seconds",
            "Kernel-smoothed TCP round-trip time, observed at each heartbeat.",
            labels=["listener", "side"],
        )
        retrans = CounterMetricFamily(
            "connwatch_tcp_retransmits",
            "TCP segments retransmitted on proxied sockets.",
            labels=["listener", "side"],
        )
        states = GaugeMetricFamily(
            "connwatch_connections_liveness",
            "Open connections by liveness state, as judged at the last heartbeat.",
            labels=["listener", "state"],
        )
        for name in stats.listeners:
            lv = stats.liveness.get(name)
            for result in BEAT_RESULTS:
                beats.add_metric([name, result], lv.heartbeats.get(result, 0) if lv else 0)
            for side in SIDES:
                if lv is not None and side in lv.rtt:
                    _hist(rtt, [name, side], lv.rtt[side])
                retrans.add_metric([name, side], lv.retransmits.get(side, 0) if lv else 0)
            for state in LIVENESS_STATES:
                states.add_metric([name, state], lv.states.get(state, 0) if lv else 0)
        yield from (beats, rtt, retrans, states)

    def _daemon(self, stats: DaemonStats) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            "connwatch_protocol_errors",
            "Malformed PROXY headers and heartbeat frames received.",
            labels=["kind"],
        )
        for kind in PROTOCOL_ERROR_KINDS:
            errors.add_metric([kind], stats.protocol_errors.get(kind, 0))
        reloads = CounterMetricFamily(
            "connwatch_config_reloads", "Configuration reloads, by result.", labels=["result"]
        )
        for result in RESULTS:
            reloads.add_metric([result], stats.reloads.get(result, 0))
        info = GaugeMetricFamily(
            "connwatch_build_info",
            "Always 1; labels carry the build.",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield from (errors, reloads, info)

    def _clients(self, stats: DaemonStats) -> Iterator[Metric]:
        """SPEC section 12: client limits and the bounded client view; no per-client labels."""
        rejections = CounterMetricFamily(
            "connwatch_client_limit_rejections",
            "Connections accepted and closed at once (reason client_limit), by client limit.",
            labels=["listener", "limit"],
        )
        tracked = GaugeMetricFamily(
            "connwatch_clients_tracked",
            "Client keys held by the bounded per-client view (GET /clients).",
            labels=["listener"],
        )
        limits = GaugeMetricFamily(
            "connwatch_listener_limit",
            "Configured limits of each listener; 0 = none.",
            labels=["listener", "limit"],
        )
        for name, cs in stats.clients.items():
            for limit in CLIENT_LIMITS:
                rejections.add_metric([name, limit], cs.rejections.get(limit, 0))
            tracked.add_metric([name], cs.tracked)
            if cs.limits:
                for limit in LISTENER_LIMITS:
                    limits.add_metric([name, limit], cs.limits.get(limit, 0))
        yield from (rejections, tracked, limits)


def build_registry(source: Callable[[], DaemonStats], *, process: bool = True) -> CollectorRegistry:
    """A fresh registry (never the global one) with connwatch's families and process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(source))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """Exposition bytes and content type; OpenMetrics when the scraper asks for it."""
    if accept and "application/openmetrics-text" in accept:
        body: bytes = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]  # untyped upstream
        return body, openmetrics.CONTENT_TYPE_LATEST
    return generate_latest(registry), CONTENT_TYPE_LATEST
