"""How `connwatch top` draws a `Snapshot`: sort order, byte rates, the rich header and table.

Rendering is kept apart from fetching (`Snapshot` -> `View`), so `connwatch demo` draws the same
table from its in-process daemon. rich is imported when used: the CLI starts faster.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from connwatch.commands.top.cells import cell_duration, cell_ms, cell_size, glyphs, new_table
from connwatch.commands.top.clients_view import (
    CLIENT_SORT_KEYS,
    VIEW_KEY,
    clients_table,
)
from connwatch.commands.top.keys import QUIT_KEYS, SORT_KEYS
from connwatch.commands.top.model import SORT_FUNCS, SORTS, Snapshot, row_rtts
from connwatch.commands.top.upstreams_table import UPSTREAMS_KEY, upstreams_table

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.table import Table
    from rich.text import Text

__all__ = ["View", "is_unicode"]

_HEADER_LINES: Final = 5
_TABLE_CHROME: Final = 4  # the table's header row, its rule, a caption and a spare line


_LIVENESS_STYLE: Final = {
    "ok": "green",
    "idle": "dim",
    "half_closed": "cyan",
    "zero_window": "yellow",
    "stalled": "bold red",
    "failing": "red",
}
_STATUS_STYLE: Final = {"UP": "green", "DOWN": "bold red", "UNKNOWN": "yellow"}
_C2U, _U2C = "client_to_upstream", "upstream_to_client"


class View:
    """How the table is drawn: sort order, listener filter, byte rates between refreshes."""

    def __init__(
        self, *, source: str, sort: str = "bytes", listener: str | None = None, keys: bool = True
    ) -> None:
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {', '.join(SORTS)}")
        self.source = source
        self.sort = sort
        self.listener = listener
        self.keys = keys
        self.upstreams = False  # the upstreams view instead of the connections table (key u)
        self.rates: dict[str, float] = {}
        self._previous: Snapshot | None = None
        self.clients_view = False  # `c` switches to the busiest clients (SPEC section 12)
        self.client_sort = "active"

    def observe(self, snapshot: Snapshot) -> None:
        """Take a new snapshot in: byte rates are the growth since the previous one."""
        previous, self._previous = self._previous, snapshot
        if previous is None or snapshot.taken <= previous.taken:
            return
        elapsed = snapshot.taken - previous.taken
        self.rates = {
            d: max(0.0, (snapshot.totals.bytes.get(d, 0) - previous.totals.bytes.get(d, 0)))
            / elapsed
            for d in (_C2U, _U2C)
        }

    def press(self, keys: str) -> str | None:
        """Apply typed keys: "quit", "sort" (the order changed) or None."""
        action = None
        for key in keys:
            if key in QUIT_KEYS:
                return "quit"
            if key.lower() == VIEW_KEY:  # clients view on or off; never both extra views
                self.clients_view = not self.clients_view
                self.upstreams = False
                action = "sort"
                continue
            if key.lower() == UPSTREAMS_KEY:
                self.upstreams = not self.upstreams
                self.clients_view = False
                action = "sort"  # redraw
                continue
            if self.clients_view:
                by = CLIENT_SORT_KEYS.get(key.lower())
                if by is not None and by != self.client_sort:
                    self.client_sort = by
                    action = "sort"
                continue
            wanted = SORT_KEYS.get(key.lower())
            if wanted is not None and wanted != self.sort:
                self.sort = wanted
                action = "sort"
        return action

    def sorted_rows(self, snapshot: Snapshot) -> list[dict[str, Any]]:
        key = SORT_FUNCS[self.sort]
        return sorted(snapshot.connections, key=key, reverse=True)

    # -- rich rendering -----------------------------------------------------------------------
    def render(
        self,
        snapshot: Snapshot,
        *,
        height: int | None = None,
        stale: str | None = None,
        unicode: bool = True,
    ) -> RenderableType:
        """Header and table; with `height`, rows are cut to fit that many terminal lines."""
        from rich.console import Group

        chrome = _HEADER_LINES + _TABLE_CHROME + (1 if snapshot.upgrade else 0)
        limit = None if height is None else max(1, height - chrome)
        header = self._header(snapshot, stale, unicode)
        if self.clients_view:
            table = clients_table(snapshot.clients, self.client_sort, limit, unicode)
            return Group(*header, table)
        if self.upstreams:
            return Group(*header, upstreams_table(snapshot.targets, limit, unicode))
        rows = self.sorted_rows(snapshot)
        return Group(*header, self._table(rows, limit, unicode))

    def _header(self, snap: Snapshot, stale: str | None, unicode: bool) -> list[Text]:
        from rich.text import Text

        arrow = "▼" if unicode else "v"
        dot = " · " if unicode else ", "
        to = "→" if unicode else "->"
        t = snap.totals
        sort = f"clients by {self.client_sort}" if self.clients_view else self.sort
        title = Text.assemble(
            ("connwatch top", "bold"),
            f"  {self.source}",
            f"  listener {self.listener}" if self.listener else "",
            "  ",
            (f"sort: {sort} {arrow}", "bold cyan"),
        )
        if self.keys and self.clients_view:
            title.append("   keys: a n b x sort, c connections, u upstreams, q quit", style="dim")
        elif self.keys and self.upstreams:
            title.append("   keys: u connections, c clients, q quit", style="dim")
        elif self.keys:
            title.append("   keys: b a i r sort, c clients, u upstreams, q quit", style="dim")
        closed_total = sum(t.closed.values())
        top3 = sorted(((n, r) for r, n in t.closed.items() if n), reverse=True)[:3]
        reasons = dot.join(f"{r} {n}" for n, r in top3)
        counts = Text.assemble(
            ("connections  ", "bold"),
            f"{t.active} active{dot}{t.accepted} accepted{dot}{closed_total} closed",
            f" ({reasons})" if reasons else "",
        )
        rates = Text.assemble(
            ("bytes/s      ", "bold"),
            f"c{to}u {cell_size(self.rates.get(_C2U, 0.0))}/s{dot}",
            f"u{to}c {cell_size(self.rates.get(_U2C, 0.0))}/s",
            "    ",
            ("liveness ", "bold"),
        )
        states = [(s, n) for s, n in t.liveness.items() if n]
        if not states:
            rates.append("-")
        for i, (state, n) in enumerate(sorted(states)):
            rates.append(dot if i else "")
            rates.append(f"{state} {n}", style=_LIVENESS_STYLE.get(state, ""))
        upstreams = Text("upstreams    ", style="bold")
        for i, up in enumerate(snap.upstreams):
            upstreams.append(dot if i else "")
            upstreams.append(f"{up.listener}/{up.address} ")
            upstreams.append(up.status, style=_STATUS_STYLE.get(up.status, ""))
        upstreams.append("    ")
        if snap.ready:
            upstreams.append("ready", style="green")
        else:
            upstreams.append("NOT READY", style="bold red")
        lines = [title, counts, rates, upstreams]
        if snap.upgrade:  # seamless upgrade under way (SPEC section 11)
            lines.append(_upgrade_line(snap.upgrade))
        if stale:
            lines.append(Text(f"stale: {stale}", style="yellow"))
        return lines

    def _table(self, rows: list[dict[str, Any]], limit: int | None, unicode: bool) -> Table:

        arrow, to = glyphs(unicode)
        marks = {name: arrow if self.sort == name else "" for name in SORTS}
        table = new_table(unicode)
        table.add_column("ID", no_wrap=True)
        table.add_column("LISTENER", no_wrap=True)
        table.add_column("CLIENT", no_wrap=True)
        table.add_column("UPSTREAM", no_wrap=True)
        table.add_column("AGE" + marks["age"], justify="right", no_wrap=True)
        table.add_column("IDLE" + marks["idle"], justify="right", no_wrap=True)
        table.add_column(f"C{to}U" + marks["bytes"], justify="right", no_wrap=True)
        table.add_column(f"U{to}C" + marks["bytes"], justify="right", no_wrap=True)
        table.add_column("STATE", no_wrap=True)
        table.add_column("LIVENESS", no_wrap=True)
        table.add_column("RTT ms c/u" + marks["rtt"], justify="right", no_wrap=True)
        table.add_column("HB", justify="right", no_wrap=True)
        shown = rows if limit is None else rows[:limit]
        for row in shown:
            table.add_row(*_cells(row))
        if len(shown) < len(rows):
            table.caption = f"... and {len(rows) - len(shown)} more (sorted by {self.sort})"
        elif not rows:
            table.caption = "no open connections"
        return table

    # -- plain text (no terminal) -------------------------------------------------------------
    def summary(self, snapshot: Snapshot) -> str:
        """One plain line of totals, for logs and pipes."""
        t = snapshot.totals
        states = " ".join(f"{s}={n}" for s, n in sorted(t.liveness.items()) if n) or "-"
        ups = " ".join(f"{u.address}={u.status}" for u in snapshot.upstreams) or "-"
        return (
            f"active={t.active} accepted={t.accepted} closed={sum(t.closed.values())} "
            f"c2u={cell_size(self.rates.get(_C2U, 0.0))}/s u2c={cell_size(self.rates.get(_U2C, 0.0))}/s "
            f"liveness: {states} upstreams: {ups} {'ready' if snapshot.ready else 'NOT-READY'}"
        )


def _upgrade_line(upgrade: Mapping[str, Any]) -> Text:
    from rich.text import Text

    state = str(upgrade.get("state", "in progress")).replace("_", " ")
    peer = upgrade.get("peer_pid")
    return Text.assemble(
        ("upgrade      ", "bold"), (state, "bold yellow"), f" (pid {peer})" if peer else ""
    )


def _cells(row: Mapping[str, Any]) -> Iterator[str | Text]:
    from rich.text import Text

    yield str(row.get("id", ""))
    yield str(row.get("listener", ""))
    yield str(row.get("client", ""))
    yield str(row.get("upstream") or "-")
    yield cell_duration(float(row.get("age_s", 0.0)))
    yield cell_duration(float(row.get("idle_s", 0.0)))
    yield cell_size(row.get("bytes_client_to_upstream", 0))
    yield cell_size(row.get("bytes_upstream_to_client", 0))
    yield str(row.get("state", ""))
    liveness = str(row.get("liveness", ""))
    yield Text(liveness, style=_LIVENESS_STYLE.get(liveness, ""))
    client, upstream = row_rtts(row)
    yield f"{cell_ms(client)}/{cell_ms(upstream)}"
    failures = int((row.get("heartbeat") or {}).get("failures", 0))
    yield Text(str(failures), style="red" if failures else "dim")


def is_unicode(console: Console) -> bool:
    return console.encoding.lower().startswith("utf")
