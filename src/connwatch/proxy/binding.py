"""Listening sockets: bind a TCP address (dual-stack where it can) or a Unix path."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from connwatch._types import Address

BACKLOG = 4096


def bind_tcp(address: Address, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket; host "" means every interface (IPv6 dual-stack where possible)."""
    host = address.host
    family = socket.AF_INET6 if (":" in host or (not host and socket.has_ipv6)) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and not host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), address.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"address {address} is already in use") from exc
        raise
    return sock


def bind_unix(path: str) -> socket.socket:
    """A listening Unix stream socket at `path`, replacing a stale socket file."""
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
