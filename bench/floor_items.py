"""The items of bench/monitoring_floor.py: SPEC's per-connection work beyond the Protocol floor,
each in its cheapest honest Python form (see that script's docstring for how they are counted).

Each item is a loop over connection objects whose body is what one connection costs, written as
it would sit inline in a callback the floor already runs (`connection_made`, the connect
coroutine, `data_received`, `eof_received`, `connection_lost`): no extra Python call, state
reached through the objects a callback holds (`c`, the connection's protocol object; `lsn`, its
listener), nothing a product could not ship. Not part of connwatch: nothing imports this but
the script.
"""

from __future__ import annotations

import bisect
import collections
import datetime as dt
import itertools
import os
import socket
import time
from collections.abc import Callable
from typing import Any

# -- the shipped defaults the items implement (SPEC section 3) ------------------------------------
BUFFER_SIZE = 256 * 1024  # buffer_size: the write high-water mark of each leg
CONNECT_TIMEOUT = 3.0  # connect_timeout
MAX_CONNECTIONS = 10000  # max_connections
KEEPALIVE = (  # keepalive.upstream: idle 60s, interval 10s, count 5, on; user_timeout 0 = default
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 5),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
)
# The daemon's bucket bounds (connwatch/histogram.py), as floats: the same series come out.
DURATION_BUCKETS = (
    *(0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0),
    *(3600.0, 21600.0, 86400.0),
)
LATENCY_BUCKETS = (
    *(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
    *(0.5, 1.0, 2.5, 5.0),
)
CLIENT_VIEW_CAPACITY = 2048  # keys held per listener (SPEC section 12: bounded)


class Conn:
    """The floor's per-connection protocol object with the fields monitoring adds to it (one
    object: the record /connections reads is the client leg itself, no object of its own)."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "client",
        "closed_ns",
        "duration",
        "ended_by",
        "entry",
        "id",
        "key",
        "opened",
        "opened_ns",
        "reason",
        "state",
        "transport",
        "watched",
    )

    def __init__(self) -> None:
        self.id = ""
        self.client = ""
        self.key = ""
        self.opened = 0.0
        self.opened_ns = 0
        self.closed_ns = 0
        self.state = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.ended_by: str | None = None  # which side ended first (close_reason sets it)
        self.reason = "client_closed"  # as the close decided it (what the lines and metrics read)
        self.duration = 0.0
        self.entry: list[int] = []  # its client-view entry
        self.transport: Any = None
        self.watched: float | None = None


class Listener:
    """What a listener holds for its connections: plain ints, lists, dicts, one deque each."""

    def __init__(self, fd: int) -> None:
        self.fd = fd  # the log (a file, as the daemon's stdout is deployed)
        self.name = "app"
        self.label = "127.0.0.1:6379"  # the target, as configured
        self.target_down = False
        self.accepting = True
        self.live: dict[str, Conn] = {}
        self.seq = itertools.count(1)
        self.prefix = "0-"  # ids are `worker-sequence`: unique across `workers`
        self.accepted = 0
        self.closed: dict[str, int] = {}
        self.duration = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.connect_hist = [0] * (len(LATENCY_BUCKETS) + 1)
        self.connect_sum = 0.0
        self.bytes_c2u = 0
        self.bytes_u2c = 0
        self.pending: collections.deque[Conn] = collections.deque()  # by open time
        self.clients: dict[str, list[int]] = {}  # key -> [accepted, last_seen ns, c2u, u2c]
        self.second = 0  # the log timestamp's current second, in ns, and its text
        self.second_end = 0
        self.stamp = ""


def _new_second(lsn: Listener, ns: int) -> None:
    """The date and time text of the second `ns` falls in: once a second, not once a line."""
    sec = ns // 1_000_000_000
    lsn.second, lsn.second_end = sec * 1_000_000_000, (sec + 1) * 1_000_000_000
    lsn.stamp = dt.datetime.fromtimestamp(sec, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


# -- the items: each a loop over connection objects, its body what one connection costs ----------
Item = Callable[[Listener, list[Conn]], None]
_DIGITS = [f"{i:03d}" for i in range(1000)]  # "000".."999": no format spec parsed per line


def empty(lsn: Listener, conns: list[Conn]) -> None:
    for _c in conns:
        pass


def opened_line(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 6: `connection_opened` as the daemon writes it today (same keys, same order, the
    timestamp to the microsecond): a dict, orjson, one os.write."""
    import orjson

    dumps, newline, time_ns, write = orjson.dumps, orjson.OPT_APPEND_NEWLINE, time.time_ns, os.write
    for c in conns:
        ns = time_ns()
        c.opened_ns = ns  # /connections' opened_at and the client view's last_seen: this read
        if not lsn.second <= ns < lsn.second_end:
            _new_second(lsn, ns)
        us = (ns - lsn.second) // 1000
        line = {
            "conn_id": c.id,
            "listener": lsn.name,
            "client": c.client,
            "upstream": lsn.label,
            "event": "connection_opened",
            "level": "info",
            "timestamp": f"{lsn.stamp}.{_DIGITS[us // 1000]}{_DIGITS[us % 1000]}Z",
        }
        write(lsn.fd, dumps(line, option=newline))


def closed_line(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 6: `connection_closed` with the eight fields SPEC lists, as the daemon writes it."""
    import orjson

    dumps, newline, time_ns, write = orjson.dumps, orjson.OPT_APPEND_NEWLINE, time.time_ns, os.write
    for c in conns:
        c.closed_ns = ns = time_ns()  # the client view's last_seen: this read
        if not lsn.second <= ns < lsn.second_end:
            _new_second(lsn, ns)
        us = (ns - lsn.second) // 1000
        line = {
            "conn_id": c.id,
            "listener": lsn.name,
            "client": c.client,
            "upstream": lsn.label,
            "duration_s": round(c.duration * 1e6) / 1e6,  # the daemon's six digits
            "bytes_client_to_upstream": c.bytes_in,
            "bytes_upstream_to_client": c.bytes_out,
            "reason": c.reason,
            "event": "connection_closed",
            "level": "info",
            "timestamp": f"{lsn.stamp}.{_DIGITS[us // 1000]}{_DIGITS[us % 1000]}Z",
        }
        write(lsn.fd, dumps(line, option=newline))


def hand_lines(lsn: Listener, conns: list[Conn]) -> None:
    """Not summed: both lines as f-strings, no dict and no orjson. The same text, because every
    value is JSON-safe by construction (ids, validated names, formatted addresses, enum reasons,
    numbers; a Unix path label would be escaped once at config time)."""
    time_ns, write = time.time_ns, os.write
    for c in conns:
        ns = time_ns()
        if not lsn.second <= ns < lsn.second_end:
            _new_second(lsn, ns)
        us = (ns - lsn.second) // 1000
        stamp = f"{lsn.stamp}.{_DIGITS[us // 1000]}{_DIGITS[us % 1000]}Z"
        head = f'{{"conn_id":"{c.id}","listener":"{lsn.name}","client":"{c.client}","upstream":"{lsn.label}"'
        write(
            lsn.fd,
            f'{head},"event":"connection_opened","level":"info","timestamp":"{stamp}"}}\n'.encode(),
        )
        ns = time_ns()
        if not lsn.second <= ns < lsn.second_end:
            _new_second(lsn, ns)
        us = (ns - lsn.second) // 1000
        stamp = f"{lsn.stamp}.{_DIGITS[us // 1000]}{_DIGITS[us % 1000]}Z"
        write(
            lsn.fd,
            f'{head},"duration_s":{round(c.duration * 1e6) / 1e6},"bytes_client_to_upstream":'
            f'{c.bytes_in},"bytes_upstream_to_client":{c.bytes_out},"reason":"{c.reason}",'
            f'"event":"connection_closed","level":"info","timestamp":"{stamp}"}}\n'.encode(),
        )


def client_address(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 4 and 6 `client` (HOST:PORT) and SPEC 12's key (the address), from the accepted
    transport (a fresh one per connection: uvloop makes its socket object on first ask)."""
    for c in conns:
        peer = c.transport.get_extra_info("peername")
        c.key = host = peer[0]
        c.client = f"{host}:{peer[1]}"


def record(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 4 `/connections` and 8 (ids): an id, the live table, the state as it moves. The
    record is the connection's protocol object itself (its fields are this script's `Conn`):
    the fields the other items set later start at their defaults in its `__init__`."""
    live, seq = lsn.live, lsn.seq
    for c in conns:
        c.state = 0  # connecting
        c.bytes_in = c.bytes_out = 0
        c.ended_by = c.watched = None
        c.id = conn_id = lsn.prefix + str(next(seq))
        live[conn_id] = c
        c.state = 1  # open, once the upstream is connected
        c.state = 2  # half_closed, at the first EOF
        c.state = 3  # closing
        del live[c.id]


def admission(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 3 `max_connections` and 8 (draining: new connections refused)."""
    for _c in conns:
        if len(lsn.live) >= MAX_CONNECTIONS or not lsn.accepting:
            raise AssertionError("never taken here")


def upstream_choice(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 3 `balance`, `connect_attempts`: the one target as shipped, not DOWN; a failed try
    goes to the retry path (`connect_attempts`: 2), so a try that works costs a `try` only."""
    for _c in conns:
        if lsn.target_down:
            raise AssertionError("never taken here")
        try:
            pass  # the floor's `await loop.create_connection(...)`
        except OSError:
            raise AssertionError("the retry path: never taken here") from None


def deadlines(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 3 `connect_timeout` and `heartbeat` (first beat after `interval`): the connection in
    its listener's FIFO (every connection has the same timeout and interval, so deadlines come in
    order); one timer for the head, re-armed per batch, cancels a connect still running at +3 s
    and makes the beat record of one still open at +5 s. A short connection leaves the head
    closed: one append and one popleft."""
    pending = lsn.pending
    for c in conns:
        pending.append(c)
        if pending[0].state == 3:  # the head has closed: it goes
            pending.popleft()


def heartbeat_mark(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 3 `heartbeat` and 5 liveness: the watched mark (counted `ok` until its first beat)
    the FIFO sweep reads; cleared at close, unbeaten (no TCP_INFO read, no record)."""
    for c in conns:
        c.watched = c.opened
        c.watched = None


def keepalive(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 3 `keepalive.upstream` on the connected socket: four setsockopt (the client socket
    inherits the listener's options, free), through a C socket that borrows the fd."""
    socket_type, inet, stream = socket.SocketType, socket.AF_INET, socket.SOCK_STREAM
    for c in conns:
        sock = socket_type(inet, stream, 0, c.transport.get_extra_info("socket").fileno())
        sock.setsockopt(*KEEPALIVE[0])
        sock.setsockopt(*KEEPALIVE[1])
        sock.setsockopt(*KEEPALIVE[2])
        sock.setsockopt(*KEEPALIVE[3])
        sock.detach()


def write_limits(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 3 `buffer_size`: each leg's write high-water mark (uvloop's default is 64 KiB)."""
    for c in conns:
        c.transport.set_write_buffer_limits(BUFFER_SIZE)
        c.transport.set_write_buffer_limits(BUFFER_SIZE)


def byte_counts(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 5 `connwatch_bytes_total` (exact) and 4's byte fields: two reads a churn connection
    (the PING, the reply), a plain int each."""
    data = b"PING\r\n"
    for c in conns:
        c.bytes_in += len(data)
        c.bytes_out += len(data)


def close_reason(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 8: the side that ended first names a clean close; a reset wins (`exc` is None on a
    clean loss)."""
    exc = None
    for c in conns:
        if c.ended_by is None:  # eof_received, the client's first
            c.ended_by = "client_closed"
        if c.ended_by is None:  # eof_received, the upstream's
            c.ended_by = "upstream_closed"
        if exc is not None:  # connection_lost: a reset wins
            c.ended_by = "client_reset"
        c.reason = c.ended_by or "error"  # closed: what the lines and metrics read


def metrics_accept(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 5 at accept: the clock read that durations start from, `accepted_total`. (The active
    gauges, upstream active and liveness `ok` are counted from the live table at scrape time.)"""
    monotonic = time.monotonic
    for c in conns:
        c.opened = monotonic()
        lsn.accepted += 1


def metrics_connect(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 5 `upstream_connect_duration_seconds`: a clock read once connected (the try started
    at accept), the histogram's bucket, count and sum as plain ints and a float."""
    monotonic, bisect_left, bounds = time.monotonic, bisect.bisect_left, LATENCY_BUCKETS
    for c in conns:
        took = monotonic() - c.opened
        lsn.connect_hist[bisect_left(bounds, took)] += 1
        lsn.connect_sum += took


def metrics_close(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 5 at close: `closed_total{reason}`, `connection_duration_seconds`, `bytes_total`
    (folded in from the connection's two ints)."""
    monotonic, bisect_left, bounds = time.monotonic, bisect.bisect_left, DURATION_BUCKETS
    for c in conns:
        c.duration = duration = monotonic() - c.opened
        lsn.duration[bisect_left(bounds, duration)] += 1
        lsn.duration_sum += duration
        closed = lsn.closed
        closed[c.reason] = closed.get(c.reason, 0) + 1
        lsn.bytes_c2u += c.bytes_in
        lsn.bytes_u2c += c.bytes_out


def client_view(lsn: Listener, conns: list[Conn]) -> None:
    """SPEC 12 `/clients`: accepted, bytes and last_seen per client key in a bounded table
    (`active` counted from the live table at request time; no limits at the defaults)."""
    clients = lsn.clients
    for c in conns:
        entry = clients.get(c.key)  # opened
        if entry is None:
            if len(clients) >= CLIENT_VIEW_CAPACITY:
                raise AssertionError("eviction: not with one client")
            entry = clients[c.key] = [0, 0, 0, 0]
        c.entry = entry  # (kept: no second lookup at close)
        entry[0] += 1
        entry[1] = c.opened_ns  # last_seen: the opened line's clock read
        entry = c.entry  # closed
        entry[2] += c.bytes_in
        entry[3] += c.bytes_out
        entry[1] = c.closed_ns  # the closed line's


def read_clock(lsn: Listener, conns: list[Conn]) -> None:
    """Not summed: `last_activity = monotonic()` per read, for SPEC 4 `idle_s`; `TCP_INFO`'s
    tcpi_last_data_recv/_sent give it at request time instead."""
    monotonic = time.monotonic
    for c in conns:
        c.opened = monotonic()
        c.opened = monotonic()


# (name, SPEC section, function, summed)
ITEMS: list[tuple[str, str, Item, bool]] = [
    ("connection_opened line (dict, orjson, os.write)", "6", opened_line, True),
    ("connection_closed line (dict, orjson, os.write)", "6", closed_line, True),
    ("client address (peername, HOST:PORT, key)", "4, 6, 12", client_address, True),
    ("connection record: id, live table, state", "4, 8", record, True),
    ("admission (max_connections, draining)", "3, 8", admission, True),
    ("upstream choice (one target not DOWN, retry path)", "3", upstream_choice, True),
    ("connect timeout + first-beat FIFO", "3", deadlines, True),
    ("heartbeat watch mark (no beat)", "3, 5", heartbeat_mark, True),
    ("keep-alive on the upstream socket (4 setsockopt)", "3", keepalive, True),
    ("write high-water mark on both legs", "3", write_limits, True),
    ("byte counts, 2 reads", "4, 5", byte_counts, True),
    ("close reason", "5, 8", close_reason, True),
    ("metrics at accept (clock read, accepted)", "5", metrics_accept, True),
    ("metrics at connect (clock read, connect histogram)", "5", metrics_connect, True),
    (
        "metrics at close (clock read, by reason, duration histogram, bytes)",
        "5",
        metrics_close,
        True,
    ),
    ("client view (bounded table)", "12", client_view, True),
    ("not summed: both lines as f-strings (no dict, no orjson)", "6", hand_lines, False),
    ("not summed: monotonic() per read, 2 reads", "4 idle_s", read_clock, False),
]
# The items that need a fresh uvloop transport per connection (`Conn.transport`).
ON_TRANSPORTS = {client_address, keepalive, write_limits}
EMPTY = "empty loop"


def make_conns(count: int) -> list[Conn]:
    """Fresh connection objects as a churn connection leaves them for the items to read."""
    conns = []
    for i in range(count):
        c = Conn()
        c.id, c.client, c.key = f"0-{100000 + i}", f"127.0.0.1:{40000 + i % 20000}", "127.0.0.1"
        c.opened, c.opened_ns = time.monotonic(), time.time_ns()
        c.bytes_in, c.bytes_out, c.duration = 6, 7, 0.0023
        conns.append(c)
    return conns
