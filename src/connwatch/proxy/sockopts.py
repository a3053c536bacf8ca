"""Socket options for proxied TCP legs: keep-alive, TCP_USER_TIMEOUT, TCP_NODELAY. Stdlib only.

Everything here is best-effort per socket and never raises for a socket that is already closed:
a peer can reset a connection between `accept()` and the moment its options are applied (or a
heartbeat fires after the transport went away). That is a normal end of a connection, reported by
the connection's own close path; turning it into an exception here would only add a second,
misleading error path. An option the kernel refuses on an open socket is skipped and the others
are still applied; `read_keepalive()` shows what actually took effect.

Closed sockets fail differently per event loop: `socket.socket` and asyncio's `TransportSocket`
raise `OSError(EBADF)`, while uvloop's pseudo-socket builds a throw-away `socket.socket` from its
fd, which is -1 once the transport closed, and so raises `ValueError("negative file descriptor")`.
Both are caught at this boundary.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from connwatch._types import SocketLike

if TYPE_CHECKING:
    from connwatch.config import KeepaliveConfig

__all__ = [
    "KeepaliveReadback",
    "apply_keepalive",
    "is_tcp",
    "read_keepalive",
    "set_nodelay",
]


@dataclass(frozen=True, slots=True)
class KeepaliveReadback:
    """Keep-alive options as the kernel reports them; None where the platform has no such
    option or the socket is not TCP."""

    enabled: bool
    idle_s: int | None
    interval_s: int | None
    count: int | None
    user_timeout_ms: int | None


_TCP_FAMILIES: Final = frozenset({socket.AF_INET, socket.AF_INET6})
# macOS names the idle option TCP_KEEPALIVE; Linux and the BSDs call it TCP_KEEPIDLE.
_KEEPIDLE: Final[int | None] = getattr(
    socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None)
)
_KEEPINTVL: Final[int | None] = getattr(socket, "TCP_KEEPINTVL", None)
_KEEPCNT: Final[int | None] = getattr(socket, "TCP_KEEPCNT", None)
_USER_TIMEOUT: Final[int | None] = getattr(socket, "TCP_USER_TIMEOUT", None)
# Linux rejects larger values with EINVAL (MAX_TCP_KEEPIDLE/KEEPINTVL/KEEPCNT); clamping keeps a
# very long configured idle working as "as long as the kernel allows" instead of not at all.
_MAX_KEEP_SECONDS: Final = 32767
_MAX_KEEPCNT: Final = 127
_MAX_USER_TIMEOUT_MS: Final = 2**31 - 1


def is_tcp(sock: SocketLike) -> bool:
    """True for an IPv4/IPv6 stream socket (open or closed); False for AF_UNIX and the rest."""
    if sock.family not in _TCP_FAMILIES:
        return False
    # Not part of SocketLike: all three socket kinds have it, a minimal stand-in may not.
    kind = getattr(sock, "type", socket.SOCK_STREAM)
    return bool(kind == socket.SOCK_STREAM)


def _is_closed(sock: SocketLike) -> bool:
    return sock.fileno() < 0


def _whole_seconds(value: float, maximum: int) -> int:
    """Seconds rounded up (250ms -> 1s), at least 1, at most what the kernel accepts."""
    _check_duration(value)
    # round() first so float noise (1.1 * 1000 = 1100.0000000000002) does not round up.
    return min(maximum, max(1, math.ceil(round(value, 6))))


def _milliseconds(value: float) -> int:
    _check_duration(value)
    return min(_MAX_USER_TIMEOUT_MS, math.ceil(round(value * 1000, 6)))


def _check_duration(value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"duration must be a finite number of seconds >= 0, got {value!r}")


def _keepalive_settings(
    enabled: bool, idle: float, interval: float, count: int, user_timeout: float
) -> list[tuple[int, int, int]]:
    """(level, option, value) in the order to apply: timings before SO_KEEPALIVE, so the
    keep-alive timer starts with the configured idle rather than the system default."""
    tcp = socket.IPPROTO_TCP
    wanted: list[tuple[int, int | None, int]] = [
        (tcp, _KEEPIDLE, _whole_seconds(idle, _MAX_KEEP_SECONDS)),
        (tcp, _KEEPINTVL, _whole_seconds(interval, _MAX_KEEP_SECONDS)),
        (tcp, _KEEPCNT, min(_MAX_KEEPCNT, max(1, count))),
        # Applies to unacknowledged data too, so it is set whether or not probes are enabled;
        # 0 restores the kernel default.
        (tcp, _USER_TIMEOUT, _milliseconds(user_timeout)),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(enabled)),
    ]
    return [(level, opt, value) for level, opt, value in wanted if opt is not None]


def apply_keepalive(
    sock: SocketLike,
    *,
    enabled: bool,
    idle: float,
    interval: float,
    count: int,
    user_timeout: float,
) -> None:
    """Set SO_KEEPALIVE, TCP_KEEPIDLE/KEEPINTVL/KEEPCNT and TCP_USER_TIMEOUT on a TCP socket.

    Durations are seconds (floats, as config gives them): idle and interval are rounded up to
    whole seconds (minimum 1), user_timeout to whole milliseconds (0 = kernel default). Options
    the platform lacks are skipped; non-TCP sockets are left alone; a closed socket is ignored.
    ValueError only for a negative or non-finite duration, which is a caller bug.
    """
    settings = _keepalive_settings(enabled, idle, interval, count, user_timeout)
    if not is_tcp(sock) or _is_closed(sock):
        return
    for level, option, value in settings:
        if not _set(sock, level, option, value):
            return


def set_nodelay(sock: SocketLike) -> None:
    """Disable Nagle on a TCP socket; no-op for other sockets and closed ones."""
    if is_tcp(sock) and not _is_closed(sock):
        _set(sock, socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _set(sock: SocketLike, level: int, option: int, value: int) -> bool:
    """setsockopt that reports False once the socket turns out to be closed."""
    try:
        sock.setsockopt(level, option, value)
    except (OSError, ValueError):
        # Closed (EBADF, or uvloop's fd -1): stop. Refused on an open socket: skip this option.
        return not _is_closed(sock)
    return True


def read_keepalive(sock: SocketLike) -> KeepaliveReadback | None:
    """The keep-alive options in effect, via getsockopt; None once the socket is closed.

    For tests and /connections debugging, not for a hot path (up to five system calls).
    """
    if _is_closed(sock):
        return None
    try:
        enabled = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        if not is_tcp(sock):
            return KeepaliveReadback(enabled, None, None, None, None)
        return KeepaliveReadback(
            enabled=enabled,
            idle_s=_get_tcp(sock, _KEEPIDLE),
            interval_s=_get_tcp(sock, _KEEPINTVL),
            count=_get_tcp(sock, _KEEPCNT),
            user_timeout_ms=_get_tcp(sock, _USER_TIMEOUT),
        )
    except (OSError, ValueError):
        return None


def _get_tcp(sock: SocketLike, option: int | None) -> int | None:
    if option is None:
        return None
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, option)
    except OSError:
        return None  # refused on an open socket; a closed one already failed SO_KEEPALIVE


SocketOptions = tuple[tuple[int, int, int], ...]


def tcp_options(
    *, enabled: bool, idle: float, interval: float, count: int, user_timeout: float
) -> SocketOptions:
    """Keep-alive and TCP_NODELAY as (level, option, value) rows, computed once per config so
    that each new socket costs only the setsockopt calls (see `apply_to_fd`)."""
    keepalive = _keepalive_settings(enabled, idle, interval, count, user_timeout)
    return (*keepalive, (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))


def keepalive_options(cfg: KeepaliveConfig) -> SocketOptions:
    """`tcp_options` of one side's keep-alive config (a listener's client or upstream)."""
    return tcp_options(
        enabled=cfg.enabled,
        idle=cfg.idle,
        interval=cfg.interval,
        count=cfg.count,
        user_timeout=cfg.user_timeout,
    )


def for_loop_socket(options: SocketOptions) -> SocketOptions:
    """`options` less the rows a TCP socket the event loop connects has already: TCP_NODELAY on
    (uvloop, and asyncio's transports, set it on every TCP socket they make) and the kernel's
    defaults of a new socket (TCP_USER_TIMEOUT 0, SO_KEEPALIVE off). A setsockopt() from Python
    costs ~0.55k instructions: two of them on every upstream connection at the defaults."""
    tcp = socket.IPPROTO_TCP
    already = {(tcp, socket.TCP_NODELAY, 1), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)}
    if _USER_TIMEOUT is not None:
        already.add((tcp, _USER_TIMEOUT, 0))
    return tuple(row for row in options if row not in already)


def apply_to_fd(fd: int, family: int, options: SocketOptions) -> None:
    """Set `options` on a TCP socket given by its fd, through one socket object.

    uvloop's transport sockets build a new socket object for every get/setsockopt call; this
    borrows the fd once instead (family and type given, so no detection syscalls either).
    """
    if family in _TCP_FAMILIES:
        apply_to_tcp_fd(fd, options)


def apply_to_tcp_fd(fd: int, options: SocketOptions) -> None:
    """`apply_to_fd` for an fd known to be a TCP socket (no family to look up)."""
    if fd < 0:
        return
    # The options are set on the fd: the wrapper's family matters not, IPv6 or IPv4. The C
    # socket type (`socket.SocketType`), not `socket.socket`: its Python __init__ and detach()
    # are two Python calls for every upstream connection, and this wrapper only borrows the fd.
    sock = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        # Inline rather than `_set` per option: this runs for every upstream connection.
        for level, option, value in options:
            try:
                sock.setsockopt(level, option, value)
            except (OSError, ValueError):
                if sock.fileno() < 0:  # closed under us: nothing more to set
                    return
    finally:
        sock.detach()
