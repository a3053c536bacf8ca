"""An accept loop that survives running out of file descriptors.

uvloop's own server answers EMFILE by accepting and dropping the waiting clients without telling
anyone. Here the listening socket is read from the loop directly: on EMFILE/ENFILE accepting
pauses for a moment, the clients wait in the backlog, and one warning a burst says how many
attempts failed; a second line says when a client is served again. A burst ends only then, not
at the next successful accept: with no fd left for the upstream leg, accepting alone is no cure.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

import structlog

log = structlog.get_logger("connwatch.listener")

_BATCH = 64  # accepts per readiness callback: fairness with the connections already open
_RETRY = 0.1  # seconds to wait after EMFILE before trying again
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_PEER_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


class Acceptor:
    """Calls `on_socket` with each accepted, non-blocking socket."""

    def __init__(
        self, sock: socket.socket, on_socket: Callable[[socket.socket], None], name: str
    ) -> None:
        self.sock = sock
        self.on_socket = on_socket
        self.name = name
        self.failures = 0  # accept attempts that failed for lack of resources, ever
        self._burst = 0  # failures since the last successful accept
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._reading = False

    def start(self) -> None:
        if not self._reading:
            self._loop.add_reader(self.sock.fileno(), self._ready)
            self._reading = True

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False
        self.sock.close()

    def _ready(self) -> None:
        for _ in range(_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _PEER_GONE:
                    continue
                self.exhausted(exc)
                return
            conn.setblocking(False)
            self.on_socket(conn)

    def served(self) -> None:
        """A client got its upstream: any burst of failures is over."""
        if self._burst:
            log.info("accept_recovered", listener=self.name, failed_attempts=self._burst)
            self._burst = 0

    def exhausted(self, exc: OSError) -> None:
        """Accepting (or a connect for an accepted client) failed: pause, log once a burst."""
        self.failures += 1
        if not self._burst:
            log.warning(
                "accept_failed",
                listener=self.name,
                error=exc.strerror or repr(exc),
                errno=errno.errorcode.get(exc.errno or 0, exc.errno),
                retry_s=_RETRY,
            )
        self._burst += 1
        if exc.errno in _EXHAUSTED:
            # Leave the clients in the backlog and look again shortly, instead of spinning.
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False
            self._retry = self._loop.call_later(_RETRY, self._resume)

    def _resume(self) -> None:
        self._retry = None
        self.start()
