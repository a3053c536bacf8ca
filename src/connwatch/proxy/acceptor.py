"""An accept loop that survives running out of file descriptors.

uvloop's own server answers EMFILE by accepting and dropping the waiting clients without telling
anyone (libuv's uv__server_io: uv__emfile_trick, no callback). So while descriptors are plenty the
loop's server makes the client transports (no Python per accept; a portable listener gives a
protocol factory), and once they run short (FdWatch, or an upstream socket() failing with
EMFILE) the listening socket is read from the loop directly. One fd is held in reserve: on
EMFILE/ENFILE it is given up for a moment to accept each waiting client and close it at once, so
clients fail fast instead of hanging in the backlog while the daemon has no fd to serve them.
One warning a burst says accepting failed; a second line says when a client is served again. A
burst ends only then, not at the next successful accept: with no fd left for the upstream leg,
accepting alone is no cure.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import os
import socket
from collections.abc import Callable
from typing import Any

import structlog

from connwatch.proxy.binding import BACKLOG
from connwatch.proxy.fd_watch import FdWatch

log = structlog.get_logger("connwatch.listener")

_BATCH = 64  # accepts per readiness callback: fairness with the connections already open
_RETRY = 0.1  # seconds to wait after EMFILE before trying again
_PROBE = 1.0  # seconds between looks at the lowest free fd while the loop's server accepts
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_NO_FDS = frozenset({errno.EMFILE, errno.ENFILE})
_PEER_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


class Acceptor:
    """Calls `on_socket` with each accepted, non-blocking socket and its peer's address (at
    once, in the same callback: a reload cannot change `plain_sockets` in between)."""

    def __init__(
        self,
        sock: socket.socket,
        on_socket: Callable[[_socket.socket, Any], None],
        name: str,
        on_shed: Callable[[], None] | None = None,
        factory: Callable[[], asyncio.Protocol] | None = None,
        plain: bool = False,
    ) -> None:
        self.sock = sock
        self._family, self._type = int(sock.family), int(sock.type)
        self._socket_class: Callable[..., _socket.socket] = _socket.socket
        self.plain_sockets(plain)
        self.on_socket = on_socket
        self.on_shed = on_shed  # called for each client turned away for lack of fds
        self.name = name
        self._reserve = _open_reserve()
        self.failures = 0  # accept attempts that failed for lack of resources, ever
        self.burst = 0  # failures since a client was last served (read per connection)
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._reading = False
        # The loop's own server, used while fds are plenty when a protocol factory is given.
        self._factory = factory
        self._server: asyncio.AbstractServer | None = None
        self._opening: asyncio.Task[None] | None = None
        self._probe: asyncio.TimerHandle | None = None
        self.fds = FdWatch(self._fds_short, self._fds_plenty)  # upstream sockets report to it

    def start(self) -> None:
        """Accept here at once; with a factory (and fds plenty) the loop's server takes over."""
        if self._server is not None or self.sock.fileno() < 0:  # serving already, or closed
            return
        if not self._reading:
            self._loop.add_reader(self.sock.fileno(), self._ready)
            self._reading = True
        if self._factory is not None and self._opening is None and not self.fds.short:
            self._opening = self._loop.create_task(self._open_server(self._factory))

    @property
    def by_loop(self) -> bool:
        """True while the loop's own server accepts (fds plenty, a factory given)."""
        return self._server is not None

    def serve_with(
        self, factory: Callable[[], asyncio.Protocol] | None, *, plain: bool = False
    ) -> None:
        """Change the factory the loop's server uses (None: accept here only) and the class of
        the sockets accepted here (`plain_sockets`); a reload."""
        self.plain_sockets(plain)
        if factory == self._factory:  # bound methods: equal, not identical, each time
            return
        self._factory = factory
        if self._reading or self._server is not None or self._opening is not None:
            self._close_server()  # (paused after EMFILE: _resume starts with the new one)
            self.start()

    def plain_sockets(self, plain: bool) -> None:
        """Accepted sockets as the C `_socket.socket` (`plain`: for a data path that wraps them
        itself, splice; no Python __init__ or close of socket.socket, ~2k instructions a
        client) or as a socket.socket (the loop's transports: uvloop closes a file object that
        is not a socket.socket itself after libuv closed its fd, which may be reused by then).
        Set again when a reload changes the listener's data path."""
        if plain:
            self._socket_class = _socket.socket
        else:
            self._socket_class = _accepted_class(self.sock.family, self.sock.type)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._close_server()
        self._stop_reading()
        self.sock.close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False

    async def _open_server(self, factory: Callable[[], asyncio.Protocol]) -> None:
        """Hand accepting to the loop's server, on a duplicate of the listening socket (closing
        a server closes its socket; ours stays for a fall-back and a successor)."""
        try:
            dup = self.sock.dup()
        except OSError:
            self._opening = None
            return  # no fd to spare: keep accepting here
        try:
            if dup.family == socket.AF_UNIX:
                server = await self._loop.create_unix_server(factory, sock=dup, backlog=BACKLOG)
            else:
                server = await self._loop.create_server(factory, sock=dup, backlog=BACKLOG)
        except OSError:
            dup.close()
            self._opening = None
            return
        self._opening = None
        if not self._reading or self.fds.short:  # closed, paused or short of fds meanwhile
            server.close()
            return
        self._server = server
        self._stop_reading()
        self._probe = self._loop.call_later(_PROBE, self._look_at_fds)

    def _look_at_fds(self) -> None:
        """Fds taken by other sockets (admin, health checks) are not seen per connection: the
        lowest free fd is looked at now and then, so that a full table turns accepting back to
        our loop, where EMFILE is seen, within a second."""
        self._probe = None
        try:
            fd = os.dup(self.sock.fileno())
        except OSError as exc:
            short = exc.errno in _NO_FDS
        else:
            os.close(fd)
            short = fd >= self.fds.high
        if short:
            self.fds.set_short(True)
        elif self._server is not None:
            self._probe = self._loop.call_later(_PROBE, self._look_at_fds)

    def _close_server(self) -> None:
        if self._opening is not None:
            self._opening.cancel()  # create_server has no await with a socket: not yet begun
            self._opening = None
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None

    def _fds_short(self) -> None:
        """Descriptors run short: accept here, where EMFILE is seen, logged and counted."""
        if self._server is not None or self._opening is not None:
            self._close_server()
            if self._retry is None:
                self.start()

    def _fds_plenty(self) -> None:
        if self._retry is None:  # paused after EMFILE: _resume starts it
            self.start()

    def _ready(self) -> None:
        for _ in range(_BATCH):
            try:
                accepted = self._accept()
            except OSError as exc:
                if exc.errno not in _NO_FDS or not self._shed_backlog(exc):
                    self.exhausted(exc)
                return
            if accepted is None:
                return
            conn, peer = accepted
            conn.setblocking(False)
            self.on_socket(conn, peer)

    def _accept(self) -> tuple[_socket.socket, Any] | None:
        """The next waiting client and its address; None when there is none. Clients already
        gone are skipped."""
        while True:
            try:
                # socket.accept() without its wrapper, which looks up family and type (two enum
                # conversions) for every client.
                fd, peer = self.sock._accept()  # type: ignore[attr-defined]
                return self._socket_class(self._family, self._type, 0, fileno=fd), peer
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                if exc.errno not in _PEER_GONE:
                    raise

    def served(self) -> None:
        """A client got its upstream: any burst of failures is over."""
        if self.burst:
            log.info("accept_recovered", listener=self.name, failed_attempts=self.burst)
            self.burst = 0

    def exhausted(self, exc: OSError) -> None:
        """Accepting (or a connect for an accepted client) failed: pause, log once a burst."""
        self._note_failure(exc)
        if exc.errno in _NO_FDS:
            self.fds.set_short(True)
        if exc.errno in _EXHAUSTED:
            # Leave the clients in the backlog and look again shortly, instead of spinning.
            self._close_server()
            self._stop_reading()
            self._retry = self._loop.call_later(_RETRY, self._resume)

    def _note_failure(self, exc: OSError) -> None:
        """Count a failed attempt; the first of a burst is logged."""
        self.failures += 1
        if not self.burst:
            log.warning(
                "accept_failed",
                listener=self.name,
                error=exc.strerror or repr(exc),
                errno=errno.errorcode.get(exc.errno or 0, exc.errno),
                retry_s=_RETRY,
            )
        self.burst += 1

    def _shed_backlog(self, exc: OSError) -> bool:
        """Out of fds: give up the reserve fd to accept each waiting client and close it at once.

        False when there is no reserve to give. Each client closed frees the fd it took, so the
        reserve is taken back afterwards without competing for one.
        """
        if self._reserve is None:
            self._reserve = _open_reserve()  # lost earlier; fds may have been freed since
            if self._reserve is None:
                return False
        os.close(self._reserve)
        self._reserve = None
        try:
            for _ in range(_BATCH):  # more than that: the loop calls again, the socket is ready
                try:
                    accepted = self._accept()
                except OSError:
                    break
                if accepted is None:
                    break
                accepted[0].close()
                self._note_failure(exc)
                if self.on_shed is not None:
                    self.on_shed()
        finally:
            self._reserve = _open_reserve()
        return True

    def _resume(self) -> None:
        self._retry = None
        self.start()


_ACCEPTED_CLASSES: dict[tuple[int, int], type[socket.socket]] = {}


def _accepted_class(family: socket.AddressFamily, kind: socket.SocketKind) -> type[socket.socket]:
    """A socket class whose `family` and `type` are constants of the listening socket's.

    socket.socket answers both through Python properties that convert to enums (four Python
    calls each time); the loop asks them three times while taking over an accepted socket.
    """
    cls = _ACCEPTED_CLASSES.get((family, kind))
    if cls is None:
        name = f"AcceptedSocket_{family.name}_{kind.name}"
        attrs = {"__slots__": (), "family": family, "type": kind}
        cls = _ACCEPTED_CLASSES[(family, kind)] = type(name, (socket.socket,), attrs)
    return cls


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
