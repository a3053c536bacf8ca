"""`connwatch top`: a live terminal table of a running daemon's connections (SPEC section 2).

It reads the admin API once a second: `/connections` for the rows, `/metrics` for the totals in
the header, `/readyz` for the upstreams. Fetching runs in a background thread so that key
presses are answered at once; rendering is kept apart from fetching (`Snapshot` -> `View`), so
`connwatch demo` draws the same table from its in-process daemon.

The terminal is put in cbreak mode (keys arrive one by one without echo; Ctrl-C still works)
and restored on every way out. Output is plain ANSI through rich, no mouse, so it works over
SSH and inside tmux or screen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TextIO

from connwatch.exceptions import AdminApiError, describe_error

if TYPE_CHECKING:  # rich and the exposition parser are imported when used: the CLI starts faster
    from rich.console import Console, RenderableType
    from rich.table import Table
    from rich.text import Text

__all__ = [
    "DEFAULT_ADMIN",
    "SORTS",
    "AdminClient",
    "Keys",
    "Snapshot",
    "Totals",
    "Upstream",
    "View",
    "add_top_parser",
    "cmd_top",
    "totals_from_metrics",
    "upstreams_from_readiness",
]

DEFAULT_ADMIN: Final = "http://127.0.0.1:9464"
SORTS: Final = ("bytes", "age", "idle", "rtt")
SORT_KEYS: Final = {"b": "bytes", "a": "age", "i": "idle", "r": "rtt"}
QUIT_KEYS: Final = frozenset("qQ")
REFRESH_S: Final = 1.0
HTTP_TIMEOUT_S: Final = 3.0
_KEY_POLL_S: Final = 0.1  # how often the UI thread looks for keys and new data
_PIPE_WIDTH: Final = 200  # columns when the output is not a terminal (--once into a file)
_HEADER_LINES: Final = 5
_TABLE_CHROME: Final = 4  # the table's header row, its rule, a caption and a spare line

EXIT_OK, EXIT_FAILURE = 0, 1


# -- what one refresh shows ---------------------------------------------------------------------
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


# -- the admin API client -----------------------------------------------------------------------
class AdminClient:
    """Blocking reads of a daemon's admin API (stdlib urllib; run it off the UI thread).

    AdminApiError when the daemon cannot be reached or answers with something else than
    connwatch's admin API; TimeoutError when it is reachable but slow (worth retrying).
    """

    def __init__(
        self, base_url: str, listener: str | None = None, timeout: float = HTTP_TIMEOUT_S
    ) -> None:
        base = base_url if "://" in base_url else f"http://{base_url}"
        self.base_url = base.rstrip("/")
        self.listener = listener
        self.timeout = timeout

    def snapshot(self) -> Snapshot:
        import urllib.parse

        query = "?" + urllib.parse.urlencode({"listener": self.listener}) if self.listener else ""
        connections = self._json("/connections" + query)
        if not isinstance(connections, list):
            raise AdminApiError(f"{self.base_url}/connections did not return a list")
        totals = totals_from_metrics(self._get("/metrics").decode(), self.listener)
        readiness = self._json("/readyz", also_ok=503)
        if not isinstance(readiness, dict):
            raise AdminApiError(f"{self.base_url}/readyz did not return an object")
        ready, upstreams = upstreams_from_readiness(readiness, self.listener)
        return Snapshot(time.monotonic(), connections, totals, upstreams, ready)

    def _json(self, path: str, also_ok: int | None = None) -> Any:
        body = self._get(path, also_ok)
        try:
            return json.loads(body)
        except ValueError:
            raise AdminApiError(
                f"{self.base_url}{path} did not return JSON: is this connwatch's admin endpoint?"
            ) from None

    def _get(self, path: str, also_ok: int | None = None) -> bytes:
        import urllib.error
        import urllib.request

        url = self.base_url + path
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as err:
            if err.code == also_ok:
                return bytes(err.read())
            raise AdminApiError(f"{url} answered HTTP {err.code} {err.reason}") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise TimeoutError(f"{url}: no answer within {self.timeout:g}s") from None
            raise AdminApiError(f"cannot reach {self.base_url}: {_reason(err.reason)}") from None
        except TimeoutError:
            raise TimeoutError(f"{url}: no answer within {self.timeout:g}s") from None
        except OSError as err:  # a reset or a broken connection in the middle of an answer
            raise AdminApiError(f"cannot read {url}: {_reason(err)}") from None


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and (reason.errno or reason.strerror):
        text = describe_error(reason)
        return text[0].lower() + text[1:]
    return str(reason)


class Poller:
    """Fetches a snapshot every `interval` in a daemon thread; the UI thread `take()`s it.

    A timeout is reported as staleness and retried; any other failure ends the polling and is
    kept in `error`.
    """

    def __init__(self, client: AdminClient, interval: float = REFRESH_S) -> None:
        self._client = client
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._latest: Snapshot | None = None
        self.stale: str | None = None
        self.error: AdminApiError | None = None
        self._thread = threading.Thread(target=self._run, name="connwatch-top-poll", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def take(self) -> Snapshot | None:
        """The snapshot fetched since the last call, if any."""
        with self._lock:
            snapshot, self._latest = self._latest, None
        return snapshot

    def close(self) -> None:
        self._stop.set()
        # Do not wait out a request in flight: the thread is a daemon thread and exits with us.
        self._thread.join(timeout=0.2)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                snapshot = self._client.snapshot()
            except TimeoutError as exc:
                self.stale = str(exc)
                continue
            except AdminApiError as exc:
                self.error = exc
                return
            with self._lock:
                self._latest = snapshot
            self.stale = None


# -- keys ---------------------------------------------------------------------------------------
class Keys:
    """Key presses from a terminal in cbreak mode; restores the terminal's modes on exit.

    Without a terminal on `stream` it reads nothing (and `read` just waits).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        stream = sys.stdin if stream is None else stream
        self.fd: int | None = None
        with contextlib.suppress(AttributeError, OSError, ValueError):
            if stream.isatty():
                self.fd = stream.fileno()
        self._saved: list[Any] | None = None

    def __enter__(self) -> Keys:
        if self.fd is not None:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd, termios.TCSANOW)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.fd is not None and self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def read(self, timeout: float) -> str:
        """Keys typed so far (waiting up to `timeout` for the first); "" when none."""
        if self.fd is None:
            time.sleep(timeout)
            return ""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return self.read_now() if ready else ""

    def read_now(self) -> str:
        """What is waiting on the terminal now (call when it is readable)."""
        if self.fd is None:
            return ""
        data = os.read(self.fd, 64)
        if not data:  # the terminal went away: stop reading keys
            self.fd = None
            return ""
        if data.startswith(b"\x1b"):  # arrow keys and other escape sequences: not ours
            return ""
        return data.decode(errors="ignore")


# -- the view -----------------------------------------------------------------------------------
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
        self.rates: dict[str, float] = {}
        self._previous: Snapshot | None = None

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
            wanted = SORT_KEYS.get(key.lower())
            if wanted is not None and wanted != self.sort:
                self.sort = wanted
                action = "sort"
        return action

    def sorted_rows(self, snapshot: Snapshot) -> list[dict[str, Any]]:
        key = _SORT_FUNCS[self.sort]
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

        rows = self.sorted_rows(snapshot)
        limit = None if height is None else max(1, height - _HEADER_LINES - _TABLE_CHROME)
        header = self._header(snapshot, stale, unicode)
        return Group(*header, self._table(rows, limit, unicode))

    def _header(self, snap: Snapshot, stale: str | None, unicode: bool) -> list[Text]:
        from rich.text import Text

        arrow = "▼" if unicode else "v"
        dot = " · " if unicode else ", "
        to = "→" if unicode else "->"
        t = snap.totals
        title = Text.assemble(
            ("connwatch top", "bold"),
            f"  {self.source}",
            f"  listener {self.listener}" if self.listener else "",
            "  ",
            (f"sort: {self.sort} {arrow}", "bold cyan"),
        )
        if self.keys:
            title.append("   keys: b a i r sort, q quit", style="dim")
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
            f"c{to}u {_size(self.rates.get(_C2U, 0.0))}/s{dot}",
            f"u{to}c {_size(self.rates.get(_U2C, 0.0))}/s",
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
        if stale:
            lines.append(Text(f"stale: {stale}", style="yellow"))
        return lines

    def _table(self, rows: list[dict[str, Any]], limit: int | None, unicode: bool) -> Table:
        from rich import box
        from rich.table import Table

        arrow = " ▼" if unicode else " v"
        to = "→" if unicode else "->"
        marks = {name: arrow if self.sort == name else "" for name in SORTS}
        table = Table(box=box.SIMPLE_HEAD if unicode else box.ASCII2, pad_edge=False, expand=False)
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
            f"c2u={_size(self.rates.get(_C2U, 0.0))}/s u2c={_size(self.rates.get(_U2C, 0.0))}/s "
            f"liveness: {states} upstreams: {ups} {'ready' if snapshot.ready else 'NOT-READY'}"
        )


def _total_bytes(row: Mapping[str, Any]) -> float:
    return float(row.get("bytes_client_to_upstream", 0) + row.get("bytes_upstream_to_client", 0))


def _rtts(row: Mapping[str, Any]) -> tuple[float | None, float | None]:
    tcp = row.get("tcp") or {}
    client, upstream = tcp.get("client"), tcp.get("upstream")
    return (
        client.get("rtt_ms") if client else None,
        upstream.get("rtt_ms") if upstream else None,
    )


def _max_rtt(row: Mapping[str, Any]) -> float:
    return max((r for r in _rtts(row) if r is not None), default=-1.0)


_SORT_FUNCS: Final = {
    "bytes": _total_bytes,
    "age": lambda row: float(row.get("age_s", 0.0)),
    "idle": lambda row: float(row.get("idle_s", 0.0)),
    "rtt": _max_rtt,
}


def _cells(row: Mapping[str, Any]) -> Iterator[str | Text]:
    from rich.text import Text

    yield str(row.get("id", ""))
    yield str(row.get("listener", ""))
    yield str(row.get("client", ""))
    yield str(row.get("upstream") or "-")
    yield _duration(float(row.get("age_s", 0.0)))
    yield _duration(float(row.get("idle_s", 0.0)))
    yield _size(row.get("bytes_client_to_upstream", 0))
    yield _size(row.get("bytes_upstream_to_client", 0))
    yield str(row.get("state", ""))
    liveness = str(row.get("liveness", ""))
    yield Text(liveness, style=_LIVENESS_STYLE.get(liveness, ""))
    client, upstream = _rtts(row)
    yield f"{_ms(client)}/{_ms(upstream)}"
    failures = int((row.get("heartbeat") or {}).get("failures", 0))
    yield Text(str(failures), style="red" if failures else "dim")


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _size(n: float) -> str:
    """1536 -> '1.5KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    """Compact ages: 4.2s, 42s, 3m07s, 2h05m, 3d04h."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def is_unicode(console: Console) -> bool:
    return console.encoding.lower().startswith("utf")


# -- the command --------------------------------------------------------------------------------
def add_top_parser(subparsers: Any) -> None:
    """Add the `top` subcommand to an argparse subparsers object."""
    top = subparsers.add_parser(
        "top",
        help="live table of a running daemon's connections",
        description="Live table of a running daemon's connections, read from its admin API "
        "every second. Keys: b, a, i, r sort by bytes, age, idle, RTT; q quits. Exit 1 when "
        "the daemon cannot be reached or goes away.",
    )
    top.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        metavar="URL",
        help=f"the daemon's admin endpoint (default: {DEFAULT_ADMIN})",
    )
    top.add_argument(
        "--sort", choices=SORTS, default="bytes", help="initial sort order (default: bytes)"
    )
    top.add_argument("--listener", metavar="NAME", help="show only this listener")
    top.add_argument("--once", action="store_true", help="print the table once and exit")


def cmd_top(args: argparse.Namespace) -> int:
    from rich.console import Console

    client = AdminClient(args.admin, args.listener)
    try:
        first = client.snapshot()
    except (AdminApiError, TimeoutError) as exc:
        print(f"connwatch top: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=_PIPE_WIDTH)
    view = View(source=client.base_url, sort=args.sort, listener=args.listener)
    view.observe(first)
    if args.once:
        view.keys = False
        console.print(view.render(first, unicode=is_unicode(console)))
        return EXIT_OK
    if not console.is_terminal:
        return _plain(view, client, first)
    return _live(console, view, client, first)


def _live(console: Console, view: View, client: AdminClient, first: Snapshot) -> int:
    from rich.live import Live

    poller = Poller(client)
    unicode = is_unicode(console)
    snapshot, stale = first, None
    poller.start()
    try:
        with (
            Keys() as keys,
            Live(
                console=console,
                screen=True,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live,
        ):
            view.keys = keys.fd is not None
            dirty = True
            while poller.error is None:
                if dirty:
                    live.update(
                        view.render(snapshot, height=console.height, stale=stale, unicode=unicode),
                        refresh=True,
                    )
                action = view.press(keys.read(_KEY_POLL_S))
                if action == "quit":
                    return EXIT_OK
                fresh = poller.take()
                dirty = action == "sort" or fresh is not None or stale != poller.stale
                stale = poller.stale
                if fresh is not None:
                    view.observe(fresh)
                    snapshot = fresh
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        poller.close()
    print(f"connwatch top: the daemon went away: {poller.error}", file=sys.stderr)
    return EXIT_FAILURE


def _plain(view: View, client: AdminClient, first: Snapshot) -> int:
    """No terminal: one summary line a second (like `top -b`), until the daemon goes away."""
    snapshot: Snapshot | None = first
    try:
        while True:
            if snapshot is not None:
                print(view.summary(snapshot), flush=True)
            time.sleep(REFRESH_S)
            try:
                snapshot = client.snapshot()
            except TimeoutError as exc:
                print(f"stale: {exc}", flush=True)
                snapshot = None
                continue
            view.observe(snapshot)
    except AdminApiError as exc:
        print(f"connwatch top: the daemon went away: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (KeyboardInterrupt, BrokenPipeError):  # Ctrl-C, or the reader left (`| head`)
        with contextlib.suppress(OSError, ValueError):  # no second error at exit's flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
