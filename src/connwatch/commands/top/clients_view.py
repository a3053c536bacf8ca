"""The clients view of `connwatch top` (SPEC section 12): the busiest client keys from
`GET /clients`, one row each. `c` switches between it and the connections table; in it, `a`, `n`,
`b` and `x` sort by active, accepted (new), bytes and rejected."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from connwatch.commands.top.cells import cell_size, glyphs, new_table

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["CLIENT_SORTS", "CLIENT_SORT_KEYS", "VIEW_KEY", "clients_table", "sorted_clients"]

VIEW_KEY: Final = "c"  # switches between the connections and the clients view
CLIENT_SORT_KEYS: Final = {"a": "active", "n": "accepted", "b": "bytes", "x": "rejected"}
CLIENT_SORTS: Final = ("active", "accepted", "bytes", "rejected")  # as /clients' ?sort=
FETCH_LIMIT: Final = 200  # rows asked of /clients each refresh


def _bytes(row: Mapping[str, Any]) -> float:
    return float(row.get("bytes_client_to_upstream", 0) + row.get("bytes_upstream_to_client", 0))


def _rejected(row: Mapping[str, Any]) -> float:
    return float(sum((row.get("rejected") or {}).values()))


_SORT_FUNCS: Final[Mapping[str, Callable[[Mapping[str, Any]], tuple[float, float]]]] = {
    "active": lambda r: (float(r.get("active", 0)), float(r.get("accepted", 0))),
    "accepted": lambda r: (float(r.get("accepted", 0)), float(r.get("active", 0))),
    "bytes": lambda r: (_bytes(r), float(r.get("accepted", 0))),
    "rejected": lambda r: (_rejected(r), float(r.get("accepted", 0))),
}


def sorted_clients(rows: list[dict[str, Any]], sort: str) -> list[dict[str, Any]]:
    return sorted(rows, key=_SORT_FUNCS[sort], reverse=True)


def clients_table(
    rows: list[dict[str, Any]],
    sort: str,
    limit: int | None,
    unicode: bool,
) -> Table:
    from rich.text import Text

    arrow, to = glyphs(unicode)
    mark = {name: arrow if sort == name else "" for name in CLIENT_SORTS}
    table = new_table(unicode)
    table.add_column("CLIENT", no_wrap=True)
    table.add_column("LISTENER", no_wrap=True)
    table.add_column("ACTIVE" + mark["active"], justify="right", no_wrap=True)
    table.add_column("ACCEPTED" + mark["accepted"], justify="right", no_wrap=True)
    table.add_column(f"C{to}U" + mark["bytes"], justify="right", no_wrap=True)
    table.add_column(f"U{to}C" + mark["bytes"], justify="right", no_wrap=True)
    table.add_column("REJ conn/rate" + mark["rejected"], justify="right", no_wrap=True)
    table.add_column("LAST SEEN", no_wrap=True)
    ordered = sorted_clients(rows, sort)
    shown = ordered if limit is None else ordered[:limit]
    for row in shown:
        rejected = row.get("rejected") or {}
        by_conn, by_rate = rejected.get("max_connections", 0), rejected.get("connection_rate", 0)
        table.add_row(
            str(row.get("client", "")),
            str(row.get("listener", "")),
            str(row.get("active", 0)),
            str(row.get("accepted", 0)),
            cell_size(row.get("bytes_client_to_upstream", 0)),
            cell_size(row.get("bytes_upstream_to_client", 0)),
            Text(f"{by_conn}/{by_rate}", style="red" if by_conn or by_rate else "dim"),
            str(row.get("last_seen", "")),
        )
    if len(shown) < len(ordered):
        table.caption = f"... and {len(ordered) - len(shown)} more (sorted by {sort})"
    elif not ordered:
        table.caption = "no clients seen"
    return table
