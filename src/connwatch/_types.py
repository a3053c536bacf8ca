"""Shared small types: addresses, directions, close reasons, observer protocols. Stdlib only."""

from __future__ import annotations

import datetime
import enum
import ipaddress
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar, overload

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Iterator


class Direction(enum.StrEnum):
    CLIENT_TO_UPSTREAM = "client_to_upstream"
    UPSTREAM_TO_CLIENT = "upstream_to_client"


class Side(enum.StrEnum):
    CLIENT = "client"
    UPSTREAM = "upstream"


class CloseReason(enum.StrEnum):
    """Every value the `reason` label and log field may take (SPEC section 5)."""

    CLIENT_CLOSED = "client_closed"
    UPSTREAM_CLOSED = "upstream_closed"
    CLIENT_RESET = "client_reset"
    UPSTREAM_RESET = "upstream_reset"
    IDLE_TIMEOUT = "idle_timeout"
    HALF_CLOSE_TIMEOUT = "half_close_timeout"
    MAX_LIFETIME = "max_lifetime"
    HEARTBEAT_FAILED = "heartbeat_failed"
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    UPSTREAM_CONNECT_FAILED = "upstream_connect_failed"
    NO_HEALTHY_UPSTREAM = "no_healthy_upstream"
    UPSTREAM_DOWN = "upstream_down"
    MAX_CONNECTIONS = "max_connections"
    SHUTDOWN = "shutdown"
    ADMIN_CLOSED = "admin_closed"
    PROTOCOL_ERROR = "protocol_error"
    CLIENT_LIMIT = "client_limit"
    ERROR = "error"


class ConnectionState(enum.StrEnum):
    """Where a proxied connection is in its life (SPEC section 8)."""

    CONNECTING = "connecting"
    OPEN = "open"
    HALF_CLOSED = "half_closed"
    CLOSING = "closing"
    CLOSED = "closed"


class Liveness(enum.StrEnum):
    OK = "ok"
    IDLE = "idle"
    HALF_CLOSED = "half_closed"
    STALLED = "stalled"
    ZERO_WINDOW = "zero_window"
    FAILING = "failing"


class HealthState(enum.StrEnum):
    UP = "UP"
    DOWN = "DOWN"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True, slots=True)
class Address:
    """A configured endpoint: TCP `host:port` (host "" = all interfaces) or a Unix socket path.

    `str()` gives back the configured spelling, which is also the `upstream` metric label.
    """

    host: str = ""
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse `HOST:PORT`, `[IPv6]:PORT`, `:PORT` or `unix:/path`; ValueError says what is wrong."""
        text = text.strip()
        if text.startswith("unix:"):
            path = text[5:]
            if not path:
                raise ValueError("unix: address needs a path, e.g. unix:/run/app.sock")
            return cls(path=path)
        if text.startswith("["):
            end = text.find("]")
            if end < 0 or text[end + 1 : end + 2] != ":":
                raise ValueError(f"{text!r}: expected [IPv6]:PORT")
            host, port_text = text[1:end], text[end + 2 :]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise ValueError(f"{text!r}: expected HOST:PORT, [IPv6]:PORT, :PORT or unix:/path")
            if ":" in host:
                raise ValueError(f"{text!r}: write IPv6 addresses in brackets, e.g. [::1]:6379")
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
        return cls(host=host, port=int(port_text))

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def format_peer(peer: object) -> str:
    """Render a socket peername (tuple or path) as `host:port`, `[v6]:port` or `unix:path`."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = str(peer[0]), int(peer[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(peer, str | bytes) and peer:
        return f"unix:{peer.decode() if isinstance(peer, bytes) else peer}"
    return "unix:" if peer == "" else "unknown"


class Clock(Protocol):
    def __call__(self) -> float: ...


def rfc3339(timestamp: float) -> str:
    """Wall-clock seconds as RFC 3339 UTC with milliseconds, e.g. 2026-11-24T23:58:18.123Z."""
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- Protocols between the planes ------------------------------------------------------------------
# Generic in the connection type so that this bottom module needs no import of the data plane.
ConnT = TypeVar("ConnT", contravariant=True)


class ConnectionObserver(Protocol[ConnT]):
    """What a connection tells the outside world as it goes; its listener implements it."""

    def connection_accepted(self, conn: ConnT) -> None: ...

    def connection_opened(self, conn: ConnT) -> None: ...

    def connection_closed(self, conn: ConnT) -> None: ...

    def flow_paused(self, conn: ConnT, direction: Direction) -> None: ...


class ConnectionLedger(Protocol[ConnT]):
    """What a listener needs of the process's connection ledger (`observe.tracker.Tracker`):
    ids, counts for admission, and the events it passes on."""

    def next_id(self) -> str: ...

    def totals(self, listener: str) -> object: ...

    def active(self, listener: str) -> int: ...

    def shed(self, listener: str) -> None: ...

    def accepted(self, conn: ConnT) -> None: ...

    def connection_opened(self, conn: ConnT) -> None: ...

    def connection_closed(self, conn: ConnT) -> None: ...

    def flow_paused(self, conn: ConnT, direction: Direction) -> None: ...

    def connections(self, listener: str | None = None) -> Iterator[object]: ...


class LivenessWatch(Protocol[ConnT]):
    """The liveness watchdog as the data plane sees it (`liveness.watchdog.Watchdog`)."""

    def watch(self, conn: ConnT) -> None: ...

    def unwatch(self, conn: ConnT) -> None: ...


class WatchedLeg(Protocol):
    """One leg of a `WatchedConnection`: its transport (None until connected) and the bytes
    connwatch holds for its peer."""

    @property
    def transport(self) -> asyncio.BaseTransport | None: ...

    @property
    def write_buffer(self) -> int: ...


class WatchedConnection(Protocol):
    """A connection as the liveness watchdog reads it (`proxy.connection.MonitoredConnection`):
    what it judges, logs and closes, and `watch`, where it keeps its record of the connection."""

    watch: object | None

    @property
    def id(self) -> str: ...

    @property
    def listener(self) -> str: ...

    @property
    def client(self) -> str: ...

    @property
    def upstream(self) -> str | None: ...

    @property
    def state(self) -> ConnectionState: ...

    @property
    def last_activity(self) -> float: ...

    @property
    def half_closed(self) -> bool: ...

    @property
    def client_leg(self) -> WatchedLeg: ...

    @property
    def upstream_leg(self) -> WatchedLeg: ...

    @property
    def client_socket(self) -> SocketLike | None: ...

    @property
    def upstream_socket(self) -> SocketLike | None: ...

    def idle(self, now: float | None = None) -> float: ...

    def close(self, reason: CloseReason, *, abort: bool = False) -> None: ...


class SocketLike(Protocol):
    """What connwatch needs from a socket: `socket.socket`, asyncio's `TransportSocket` and
    uvloop's pseudo-socket (both from `transport.get_extra_info("socket")`) all fit."""

    @property
    def family(self) -> int: ...

    def fileno(self) -> int: ...

    @overload
    def getsockopt(self, level: int, optname: int, /) -> int: ...
    @overload
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...

    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...


class Throttle:
    """Lets a repeating warning through at most once per `interval` seconds per key; the next
    line that passes carries `suppressed`, the number held back in between."""

    __slots__ = ("_interval", "_last", "_suppressed")

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None to drop this line; else how many were suppressed before it (to log)."""
        now = time.monotonic()
        if now - self._last.get(key, -self._interval) < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


class UpstreamOutcomes(Protocol):
    """Where the data plane reports how real client connections to a target went, for passive
    health (SPEC section 10). The runtime wires it: the primary's outlier detector, or in a worker
    a buffer the primary drains. Labels, not objects, so that outcomes can cross processes."""

    def upstream_succeeded(self, listener: str, upstream: str) -> None: ...

    def upstream_failed(self, listener: str, upstream: str) -> None: ...
