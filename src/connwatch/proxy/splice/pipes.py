"""Pipes for splicing: a pool per pipe size, held only while bytes are in flight.

A pipe that saw an error, or still holds bytes nobody will read, is closed and never pooled (a
reused dirty pipe hands one connection's bytes to the next). The pool is per process, since the
descriptor limit is; when descriptors run out, pooled pipes give way and none is made for a
moment, so that splicing never costs a client its accept or its upstream connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import time
import weakref
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_IDLE_PIPES",
    "NO_FDS",
    "Pipe",
    "PipePool",
    "PipePoolStats",
    "fd_pressure",
    "note_fd_pressure",
    "pipe_pool",
    "release_idle_pipes",
]

MAX_IDLE_PIPES: Final = 256  # idle pipes kept per pool (512 fds of the 20,000 a process may hold)
PIPE_IDLE_TIMEOUT: Final = 5.0  # seconds: a pool nobody took from for this long closes its pipes
FD_PRESSURE_HOLD: Final = 1.0  # seconds without new pipes after running out of descriptors
NO_FDS: Final = frozenset({errno.EMFILE, errno.ENFILE})
_SETPIPE_SZ: Final[int | None] = getattr(fcntl, "F_SETPIPE_SZ", None)

Pipe = tuple[int, int]  # (read end, write end)


@dataclass(frozen=True, slots=True)
class PipePoolStats:
    size: int  # bytes each pipe was asked to hold
    idle: int  # pipes waiting in the pool
    created: int
    reused: int  # takes served from the pool
    discarded: int  # closed after an error or while holding bytes: never reused


class PipePool:
    """Empty pipes for splicing, taken while bytes are in flight and given back when drained.

    A pipe that saw an error, or still holds bytes nobody will read, is closed (`discard`), never
    pooled: a reused dirty pipe would hand one connection's bytes to the next. Idle pipes are
    closed once none was taken for `idle_timeout` seconds, so a quiet process holds none.
    """

    __slots__ = (
        "__weakref__",
        "_takes_at_check",
        "_trim",
        "created",
        "discarded",
        "idle",
        "idle_timeout",
        "max_idle",
        "reused",
        "size",
        "takes_back",
    )

    def __init__(
        self, size: int, max_idle: int = MAX_IDLE_PIPES, idle_timeout: float = PIPE_IDLE_TIMEOUT
    ) -> None:
        self.size = size
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: list[Pipe] = []  # taken from directly by the transports (no call a read)
        # True while a returned pipe may simply be appended to `idle` (below max_idle): the trim
        # timer is armed and no shortage of descriptors was noted since. Transports read it to
        # give back without calling `give` (once a read); `give` itself is the careful way.
        self.takes_back = False
        self._trim: asyncio.TimerHandle | None = None
        self._takes_at_check = 0
        self.created = 0
        self.reused = 0
        self.discarded = 0
        _EVERY_POOL.add(self)

    def take(self) -> Pipe:
        """An empty pipe; OSError (EMFILE...) when none can be made, or while the process is
        short of descriptors (the caller then copies through user space)."""
        if self.idle:
            self.reused += 1
            return self.idle.pop()
        if fd_pressure():
            raise OSError(errno.EMFILE, "no new pipes while descriptors are short")
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in NO_FDS:
                note_fd_pressure()
            raise
        self.created += 1
        if _SETPIPE_SZ is not None:
            # Refused past the user's pipe budget (pipe-user-pages-soft): the pipe keeps its size.
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, _SETPIPE_SZ, self.size)
        return r, w

    def give(self, pipe: Pipe) -> None:
        """Return a pipe that is empty and saw no error."""
        # `fd_pressure()` inline: a pipe comes back after every spliced read.
        if len(self.idle) < self.max_idle and not (
            _pressure_until > 0.0 and time.monotonic() < _pressure_until
        ):
            self.idle.append(pipe)
            if self._trim is None:
                self._arm_trim()
            self.takes_back = True
        else:
            _close_pipe(pipe)

    def _arm_trim(self) -> None:
        self._takes_at_check = self.created + self.reused
        loop = asyncio.get_running_loop()
        self._trim = loop.call_later(self.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        self._trim = None
        self.takes_back = False  # until `give` re-arms the timer
        if self.created + self.reused == self._takes_at_check:
            self.close()  # nothing taken for a whole period
        elif self.idle:
            self._arm_trim()

    def discard(self, pipe: Pipe) -> None:
        self.discarded += 1
        _close_pipe(pipe)

    def close(self) -> None:
        """Close the idle pipes (pipes in use are closed by their transports)."""
        self.takes_back = False
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        while self.idle:
            _close_pipe(self.idle.pop())

    def statistics(self) -> PipePoolStats:
        return PipePoolStats(self.size, len(self.idle), self.created, self.reused, self.discarded)


def _close_pipe(pipe: Pipe) -> None:
    for fd in pipe:
        with contextlib.suppress(OSError):
            os.close(fd)


_POOLS: dict[int, PipePool] = {}
_EVERY_POOL: weakref.WeakSet[PipePool] = weakref.WeakSet()  # those made elsewhere too (tests)


def release_idle_pipes() -> int:
    """Close every idle pooled pipe (they are a cache); the number of pipes closed."""
    closed = 0
    for pool in _POOLS.values():
        closed += pool.statistics().idle
        pool.close()
    return closed


_pressure_until = 0.0  # monotonic time until which no pipe is made or pooled


def note_fd_pressure() -> int:
    """The process ran out of descriptors: for a while, make and pool no pipes (legs copy
    through user space, as the portable path does), so that splicing does not take the fds
    that accepts and upstream connects need. Idle pipes are closed; returns how many."""
    global _pressure_until
    _pressure_until = time.monotonic() + FD_PRESSURE_HOLD
    for pool in _EVERY_POOL:
        pool.takes_back = False  # returns go through `give`, which sees the shortage
    return release_idle_pipes()


def fd_pressure() -> bool:
    return _pressure_until > 0.0 and time.monotonic() < _pressure_until


def pipe_pool(size: int) -> PipePool:
    """The process's pool of pipes of `size` bytes: one per size, shared by every listener, since
    the descriptor limit is per process and a removed listener must not strand idle pipes."""
    pool = _POOLS.get(size)
    if pool is None:
        pool = _POOLS[size] = PipePool(size)
    return pool
