"""What one refresh of `connwatch top` shows: the rows, the header's totals, the upstreams.

Plain data and the pure functions that build it from the admin API's answers (`/metrics`,
`/readyz`) and order its rows; no I/O and no rendering, so `connwatch demo` fills the same
`Snapshot` from its in-process daemon.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "SORTS",
    "SORT_FUNCS",
    "Snapshot",
    "Totals",
    "Upstream",
    "row_rtts",
    "totals_from_metrics",
    "upstreams_from_readiness",
]

SORTS: Final = ("bytes", "age", "idle", "rtt")


@dataclass(frozen=True, slots=True)
class Totals:
    """Counts for the header, summed over the shown listeners."""

    active: int = 0
    accepted: int = 0
    closed: Mapping[str, int] = field(default_factory=dict)  # reason -> count
    bytes: Mapping[str, int] = field(default_factory=dict)  # direction -> bytes
    liveness: Mapping[str, int] = field(default_factory=dict)  # state -> open connections


@dataclass(frozen=True, slots=True)
class Upstream:
    listener: str
    address: str
    status: str  # UP | DOWN | UNKNOWN


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One refresh: the rows, the totals and the upstreams, taken at `taken` (monotonic)."""

    taken: float
    connections: list[dict[str, Any]]
    totals: Totals
    upstreams: list[Upstream]
    ready: bool
    upgrade: dict[str, Any] | None = None  # /healthz `upgrade` while one is under way
    clients: list[dict[str, Any]] = field(default_factory=list)  # `/clients` rows (SPEC §12)
    targets: list[Any] = field(default_factory=list)  # upstreams_table.TargetRow, from /upstreams


def totals_from_metrics(text: str, listener: str | None = None) -> Totals:
    """The header's totals from a `/metrics` exposition (only `listener`'s series if given)."""
    from prometheus_client.parser import text_string_to_metric_families

    active = accepted = 0
    closed: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    liveness: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("connwatch_"):
            continue
        for sample in family.samples:
            labels = sample.labels
            if listener is not None and labels.get("listener") != listener:
                continue
            value = int(sample.value)
            if sample.name == "connwatch_connections_active":
                active += value
            elif sample.name == "connwatch_connections_accepted_total":
                accepted += value
            elif sample.name == "connwatch_connections_closed_total":
                closed[labels["reason"]] += value
            elif sample.name == "connwatch_bytes_total":
                nbytes[labels["direction"]] += value
            elif sample.name == "connwatch_connections_liveness":
                liveness[labels["state"]] += value
    return Totals(active, accepted, dict(closed), dict(nbytes), dict(liveness))


def upstreams_from_readiness(
    body: Mapping[str, Any], listener: str | None = None
) -> tuple[bool, list[Upstream]]:
    """(ready, upstreams) from a `/readyz` body (SPEC section 4)."""
    out: list[Upstream] = []
    listeners = body.get("listeners") or {}
    for name, entry in sorted(listeners.items()):
        if listener is not None and name != listener:
            continue
        for address, info in (entry.get("upstreams") or {}).items():
            out.append(Upstream(name, address, str(info.get("status", "UNKNOWN"))))
    return body.get("status") == "UP", out


# -- rows: one `/connections` record each (SPEC section 4) ---------------------------------------
def _total_bytes(row: Mapping[str, Any]) -> float:
    return float(row.get("bytes_client_to_upstream", 0) + row.get("bytes_upstream_to_client", 0))


def row_rtts(row: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(client RTT ms, upstream RTT ms) of a row; None where the kernel gave none."""
    tcp = row.get("tcp") or {}
    client, upstream = tcp.get("client"), tcp.get("upstream")
    return (
        client.get("rtt_ms") if client else None,
        upstream.get("rtt_ms") if upstream else None,
    )


def _max_rtt(row: Mapping[str, Any]) -> float:
    return max((r for r in row_rtts(row) if r is not None), default=-1.0)


# sort name -> the key a row is sorted by (largest first)
SORT_FUNCS: Final[Mapping[str, Callable[[Mapping[str, Any]], float]]] = {
    "bytes": _total_bytes,
    "age": lambda row: float(row.get("age_s", 0.0)),
    "idle": lambda row: float(row.get("idle_s", 0.0)),
    "rtt": _max_rtt,
}
