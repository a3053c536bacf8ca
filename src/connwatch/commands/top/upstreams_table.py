"""The upstreams view of `connwatch top` (key `u`): one row per target from `GET /upstreams`
(SPEC section 4): state and why, a passive ejection's end, the slow-start weight, open
connections and the warm pool's figures."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from connwatch.commands.top.cells import new_table

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["UPSTREAMS_KEY", "TargetRow", "target_rows", "upstreams_table"]

UPSTREAMS_KEY: Final = "u"  # toggles between the connections and the upstreams view
_STATUS_STYLE: Final = {"UP": "green", "DOWN": "bold red", "UNKNOWN": "yellow"}


@dataclass(frozen=True, slots=True)
class TargetRow:
    listener: str
    address: str
    status: str
    cause: str
    ejected_until: str | None  # RFC 3339
    weight: float
    active: int
    pool: Mapping[str, Any] | None


def target_rows(body: Mapping[str, Any], listener: str | None = None) -> list[TargetRow]:
    """Rows from a `/upstreams` body, listeners by name, targets in config order."""
    rows: list[TargetRow] = []
    for name, entry in sorted((body.get("listeners") or {}).items()):
        if listener is not None and name != listener:
            continue
        for address, info in (entry.get("upstreams") or {}).items():
            rows.append(
                TargetRow(
                    name,
                    address,
                    str(info.get("status", "UNKNOWN")),
                    str(info.get("cause", "")),
                    info.get("ejected_until"),
                    float(info.get("weight", 1.0)),
                    int(info.get("active", 0)),
                    info.get("pool"),
                )
            )
    return rows


def _remaining(until: str | None, now: datetime.datetime | None = None) -> str:
    """`12.3s` left of an ejection, or `-`."""
    if not until:
        return "-"
    try:
        end = datetime.datetime.fromisoformat(until.replace("Z", "+00:00"))
    except ValueError:
        return until
    now = now or datetime.datetime.now(datetime.UTC)
    return f"{max(0.0, (end - now).total_seconds()):.1f}s"


def _pool(pool: Mapping[str, Any] | None) -> str:
    if not pool:
        return "-"
    evictions = pool.get("evictions")
    if isinstance(evictions, Mapping):
        evictions = sum(int(v) for v in evictions.values())
    return (
        f"idle {pool.get('idle', 0)} hit {pool.get('hits', 0)} "
        f"miss {pool.get('misses', 0)} evict {evictions or 0}"
    )


def upstreams_table(rows: list[TargetRow], limit: int | None, unicode: bool) -> Table:
    from rich.text import Text

    table = new_table(unicode)
    for column, right in (
        ("LISTENER", False),
        ("UPSTREAM", False),
        ("STATUS", False),
        ("CAUSE", False),
        ("EJECTED", True),
        ("WEIGHT", True),
        ("ACTIVE", True),
        ("POOL", False),
    ):
        table.add_column(column, justify="right" if right else "left", no_wrap=True)
    shown = rows if limit is None else rows[:limit]
    for row in shown:
        table.add_row(
            row.listener,
            row.address,
            Text(row.status, style=_STATUS_STYLE.get(row.status, "")),
            row.cause,
            _remaining(row.ejected_until),
            f"{row.weight:.2f}",
            str(row.active),
            _pool(row.pool),
        )
    if len(shown) < len(rows):
        table.caption = f"... and {len(rows) - len(shown)} more"
    elif not rows:
        table.caption = "no upstream targets"
    return table
