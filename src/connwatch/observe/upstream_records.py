"""The `GET /upstreams` body (SPEC section 4): per listener and target, its state, why it last
changed, a passive ejection's end, the slow-start weight, open connections and the warm pool.

Built from one `DaemonStats` (merged over workers by the caller), so it reads only snapshots.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connwatch._types import rfc3339
from connwatch.snapshots import DaemonStats, TargetStats

POOL_FIELDS = ("idle", "hits", "misses", "evictions")


def pool_record(target: TargetStats) -> dict[str, Any] | None:
    """The target's warm-pool figures, or None when it has no pool (SPEC section 9). The pool
    rides on `TargetStats.pool` (a record or mapping with POOL_FIELDS) when the pool exists."""
    pool = getattr(target, "pool", None)
    if pool is None:
        return None
    if isinstance(pool, Mapping):
        return {name: pool.get(name) for name in POOL_FIELDS}
    return {name: getattr(pool, name, None) for name in POOL_FIELDS}


def target_record(target: TargetStats, active: int) -> dict[str, Any]:
    return {
        "status": str(target.state),
        "cause": target.cause,
        "ejected_until": (
            rfc3339(target.ejected_until) if target.ejected_until is not None else None
        ),
        "weight": target.weight,
        "active": active,
        "pool": pool_record(target),
    }


def upstream_records(stats: DaemonStats, listener: str | None = None) -> dict[str, Any]:
    """`{"listeners": {NAME: {"upstreams": {ADDR: {...}}}}}`, targets in config order."""
    out: dict[str, Any] = {}
    for (name, label), target in stats.targets.items():
        if listener is not None and name != listener:
            continue
        counts = stats.listeners.get(name)
        active = counts.upstream_active.get(label, 0) if counts is not None else 0
        entry = out.setdefault(name, {"upstreams": {}})
        entry["upstreams"][label] = target_record(target, active)
    return {"listeners": out}
