"""DaemonBackend: what the admin endpoint and the metrics ask of the daemon (observe.admin's
AdminBackend): statistics merged over the workers, connection records, readiness, closing one
connection; and the concrete settings the primary hands its workers."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from prometheus_client import CollectorRegistry

from connwatch._types import Address, CloseReason, ConnectionState, HealthState, Liveness, rfc3339
from connwatch.observe.clients import merge_records, top_records
from connwatch.observe.metrics import build_registry
from connwatch.observe.tracker import snapshot_record
from connwatch.observe.upstream_records import upstream_records
from connwatch.proxy.connection import MonitoredConnection
from connwatch.runtime.state import DaemonState, Role
from connwatch.snapshots import ClientStats, ConnectionStats, DaemonStats, TargetStats


class DaemonBackend:
    """Reads the daemon's state for admin and metrics; in the primary, also asks the workers."""

    def __init__(self, state: DaemonState) -> None:
        self._state = state
        self._merged: DaemonStats | None = None  # all workers, taken just before a scrape
        self._registry = build_registry(lambda: self._merged or self.statistics())

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    def statistics(self) -> DaemonStats:
        state = self._state
        targets: dict[tuple[str, str], TargetStats] = {}
        for listener in state.listeners.values():
            for target in listener.statistics().targets:
                targets[(target.listener, target.label)] = target
        return DaemonStats(
            listeners=state.tracker.statistics(),
            targets=targets,
            liveness=state.liveness.statistics() if state.liveness is not None else {},
            protocol_errors=self._protocol_errors(),
            reloads=dict(state.reloads),
            clients=self._client_stats(),
        )

    async def refresh_metrics(self) -> None:
        """Before a scrape: merge every worker's snapshot (one process reads live state)."""
        pool = self._state.pool
        predecessor = self._state.predecessor  # seamless upgrade: the old process's figures
        older = await predecessor.statistics() if predecessor is not None else []
        if not pool.workers and not older:
            self._merged = None
            return
        workers = await pool.statistics() if pool.workers else []
        self._merged = DaemonStats.merge_all([self.statistics(), *workers, *older])

    async def upstreams(self, listener: str | None = None) -> dict[str, Any]:
        """`GET /upstreams`: every target's state, cause, ejection, weight, active and pool,
        merged over the workers (the primary's state and cause; connections of all)."""
        stats = self.statistics()
        if self._state.pool.workers:
            stats = DaemonStats.merge_all([stats, *await self._state.pool.statistics()])
        return upstream_records(stats, listener)

    async def connection_records(
        self, listener: str | None, min_idle: float | None, limit: int | None
    ) -> list[dict[str, Any]]:
        records = self.local_records(listener, min_idle, limit)
        pool = self._state.pool
        if pool.workers and (limit is None or len(records) < limit):
            more = await pool.connection_records(listener=listener, min_idle=min_idle, limit=limit)
            records.extend(more[: None if limit is None else limit - len(records)])
        predecessor = self._state.predecessor  # seamless upgrade: the old one's, while it drains
        if predecessor is not None and (limit is None or len(records) < limit):
            more = await predecessor.connection_records(
                listener=listener, min_idle=min_idle, limit=limit
            )
            records.extend(more[: None if limit is None else limit - len(records)])
        return records

    def local_records(
        self, listener: str | None, min_idle: float | None, limit: int | None
    ) -> list[dict[str, Any]]:
        """The connections of this process (a worker answers the primary with these)."""
        now = time.monotonic()
        out: list[dict[str, Any]] = []
        for conn in self._state.tracker.connections(listener):
            if limit is not None and len(out) >= limit:
                break
            stats = conn.statistics(now)
            if stats.state is ConnectionState.CONNECTING:
                continue
            if min_idle is not None and stats.idle < min_idle:
                continue
            record = snapshot_record(stats)
            record.update(self._describe(conn, stats))
            out.append(record)
        return out

    def _describe(self, conn: MonitoredConnection, stats: ConnectionStats) -> dict[str, Any]:
        if self._state.liveness is not None:
            return self._state.liveness.describe(conn)
        liveness = Liveness.HALF_CLOSED if stats.half_closed else Liveness.OK
        return {
            "liveness": str(liveness),
            "heartbeat": {"state": "ok", "failures": 0, "interval_s": None},
            "tcp": None,
        }

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        listeners: dict[str, Any] = {}
        # Not before the start is complete: with `workers`, the primary serves this endpoint
        # while its workers are still starting, and a start can still fail (SPEC: /readyz covers
        # all workers).
        ready = self._state.started and not self._state.draining
        for name, listener in self._state.listeners.items():
            snap = listener.statistics()
            upstreams = {
                t.label: {
                    "status": str(t.state),
                    "last_check": rfc3339(t.last_check) if t.last_check is not None else None,
                    "latency_ms": t.latency_ms,
                    "consecutive_failures": t.consecutive_failures,
                }
                for t in snap.targets
            }
            up = (
                snap.bound
                and snap.accepting
                and (not snap.health_checks or any(t.state is HealthState.UP for t in snap.targets))
            )
            ready = ready and up
            listeners[name] = {"status": "UP" if up else "DOWN", "upstreams": upstreams}
        return ready, {"status": "UP" if ready else "DOWN", "listeners": listeners}

    async def close_connection(self, conn_id: str) -> bool:
        state = self._state
        conn = state.tracker.get(conn_id)
        if conn is None:
            if state.pool.workers and await state.pool.close_connection(conn_id):
                return True
            if state.predecessor is not None:  # seamless upgrade: the old one's connection
                return await state.predecessor.close_connection(conn_id)
            return False
        conn.close(CloseReason.ADMIN_CLOSED)
        return True

    # -- clients (SPEC section 12) ----------------------------------------------------------------
    def _client_stats(self) -> dict[str, ClientStats]:
        summaries = self._state.tracker.client_summaries()
        out: dict[str, ClientStats] = {}
        for name, summary in summaries.items():
            out[name] = ClientStats(name, len(summary), dict(summary.rejections))
        if self._state.role is not Role.WORKER:  # configured limits: the primary says them once
            for name, listener in self._state.listeners.items():
                cfg = listener.config
                limits = {
                    "max_connections": float(cfg.max_connections),
                    "client_max_connections": float(cfg.client_limits.max_connections),
                    "client_connection_rate": float(cfg.client_limits.connection_rate),
                }
                have = out.get(name)
                out[name] = ClientStats(
                    name,
                    have.tracked if have else 0,
                    have.rejections if have else {},
                    limits,
                )
        return out

    async def client_records(
        self, listener: str | None, sort: str, limit: int
    ) -> list[dict[str, Any]]:
        """`GET /clients`: this process's view, merged with every worker's, the top `limit`."""
        parts = [self.local_client_records(listener)]
        if self._state.pool.workers:
            parts.extend(await self._state.pool.client_records(listener=listener))
        return top_records(merge_records(parts), sort, limit)

    def local_client_records(self, listener: str | None) -> list[dict[str, Any]]:
        """Raw records of this process; `active` from the limiters' exact counts."""
        records = self._state.tracker.client_records(listener)
        exact: dict[str, dict[str, int]] = {}
        for held in self._state.all_listeners():
            counts = exact.setdefault(held.name, {})
            for key, n in held.clients.active.items():
                counts[key] = counts.get(key, 0) + n
        for rec in records:
            rec["active"] = exact.get(rec["listener"], {}).get(rec["client"], 0)
        return records

    def _protocol_errors(self) -> dict[str, int]:
        total = Counter(self._state.protocol_errors)
        for listener in self._state.all_listeners():
            total.update(listener.statistics().protocol_errors)
        return dict(total)


def concrete_settings(state: DaemonState) -> dict[str, Any]:
    """The settings as JSON-safe data with port-0 listeners pinned to the ports we got,
    so that every worker binds the same ones."""
    data: dict[str, Any] = state.settings.model_dump(mode="json")
    data["admin"]["token"] = None  # workers serve no admin endpoint
    for raw in data["listeners"]:
        listener = state.listeners.get(raw["name"])
        address = listener.config.listen if listener is not None else None
        if listener is not None and address is not None and address.path is None:
            raw["listen"] = str(Address(address.host, listener.port))
    return data


def worker_init(state: DaemonState) -> dict[str, Any]:
    """The `init` message of a new worker: the concrete settings and every target's state."""
    states = {
        name: {t.label: str(t.state) for t in listener.statistics().targets}
        for name, listener in state.listeners.items()
    }
    return {"settings": concrete_settings(state), "states": states}
