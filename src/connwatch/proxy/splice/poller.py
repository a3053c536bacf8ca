"""One epoll set for all spliced sockets of an event loop, seen by the loop as a single reader.

uvloop's `add_reader`/`add_writer` cost a libuv poll handle and a callback handle per socket,
about 600 bytes, and an idle proxied connection keeps both of its sockets registered for
reading. Here a registered socket costs one dict entry and an entry in the kernel's epoll set:
the difference is most of what an idle spliced connection holds in user space.

Level-triggered like `add_reader`: a socket that stays ready is reported again at the next
round, so a callback that leaves data unread (flow control) loses nothing.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import os
import select
import socket
import weakref
from typing import Final, Protocol, TypeVar

__all__ = ["BOTH", "IN", "OUT", "Poller", "Watched", "poller"]

IN: Final = select.EPOLLIN
OUT: Final = select.EPOLLOUT
BOTH: Final = IN | OUT
_TROUBLE: Final = select.EPOLLERR | select.EPOLLHUP  # wakes whichever side is registered
# What wakes a reader, a writer (worked out once, not per event)
_WAKES_IN: Final = IN | _TROUBLE
_WAKES_OUT: Final = OUT | _TROUBLE
# connect_ex() answers for a connect still under way (what sock.connect raises as
# BlockingIOError or InterruptedError)
_CONNECTING: Final = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY, errno.EINTR})
_BATCH: Final = 512  # events per round: the loop's other callbacks get their turn between
_S = TypeVar("_S", bound=_socket.socket)


class Watched(Protocol):
    """A socket's owner: what to call when a direction it waits for is ready.

    `polled` is the poller's own note of the events registered for it (0: none); keeping it on
    the owner spares the poller a second dict entry per socket.
    """

    polled: int

    def on_readable(self) -> None: ...

    def on_writable(self) -> None: ...


class Poller:
    """The loop watches the epoll fd; `set` keeps each socket's interest in step with its owner."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._epoll = select.epoll()
        self._owners: dict[int, Watched] = {}
        # Weak: the loop holds the poller through its reader, and `poller()` must let both go.
        self._loop = weakref.ref(loop)
        loop.add_reader(self._epoll.fileno(), self._dispatch)
        # fds a finished connect left in the epoll set, disabled (EPOLLONESHOT): their owner's
        # first `set` re-arms them with one modify, not unregister + register. An entry whose
        # socket was closed in between is stale (the kernel dropped it with the socket).
        self._dormant: set[int] = set()

    def set(self, fd: int, owner: Watched, mask: int) -> None:
        """Register, change or drop `fd` to wait for `mask` (IN, OUT, BOTH or 0: none). Drop it
        before closing `fd`. The owner passes the mask it computed (no call back to ask it)."""
        old = owner.polled
        if mask == old:
            return
        owner.polled = mask
        if not mask:
            self._epoll.unregister(fd)
            del self._owners[fd]
        elif old:
            self._epoll.modify(fd, mask)
        else:
            dormant = self._dormant
            if fd in dormant:  # left by a finished connect: re-armed (no call of its own)
                dormant.discard(fd)
                try:
                    self._epoll.modify(fd, mask)
                except FileNotFoundError:  # stale: that socket was closed, this is another one
                    self._epoll.register(fd, mask)
            else:
                self._epoll.register(fd, mask)
            self._owners[fd] = owner

    def forget(self, fd: int, owner: Watched) -> None:
        """Drop `fd` without an epoll_ctl, for a socket about to be closed: closing it removes
        it from the epoll set (no socket here is ever dup()ed, which would keep it there)."""
        if owner.polled:
            owner.polled = 0
            del self._owners[fd]

    async def connect(self, sock: _S, address: tuple[object, ...] | str) -> _S:
        """`sock.connect` for a non-blocking socket, waiting here instead of in a loop handle;
        `sock` once connected. It is closed if the connect fails or is cancelled (the caller's
        cleanup, done here so that callers hand on this coroutine, not wrap it in their own)."""
        try:
            # connect_ex: the usual EINPROGRESS as a number, not a raised BlockingIOError (about
            # 5k instructions an upstream connect).
            err = sock.connect_ex(address)
            if not err:
                return sock
            if err not in _CONNECTING:
                raise OSError(err, os.strerror(err))
            fd = sock.fileno()
            loop = self._loop()  # the running loop (a weakref call; asking would cost a getpid)
            assert loop is not None
            waiter = _ConnectWaiter()  # no __init__: a Python call fewer a connect
            waiter.poller = self
            waiter.fd = fd
            waiter.done = loop.create_future()
            if fd in self._dormant:
                self._dormant.discard(fd)  # stale: a fresh socket is in no epoll set
            # One-shot: once reported, the kernel disables the fd and the waiter leaves it in
            # the set, dormant, for the transport that takes the socket over.
            self._epoll.register(fd, OUT | select.EPOLLONESHOT)
            # Noted as BOTH though the kernel watches OUT: EPOLLERR/EPOLLHUP, which a failed
            # connect raises, then reach on_readable too (see _ConnectWaiter).
            waiter.polled = BOTH
            self._owners[fd] = waiter
            try:
                failed = await waiter.done
            except BaseException:
                self.set(fd, waiter, 0)  # still armed unless it fired (then polled is 0)
                raise
            # SO_ERROR asked only after an error event: a connect that succeeded reports
            # EPOLLOUT alone (a getsockopt call fewer for most connects).
            if failed and (err := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)):
                raise OSError(err, os.strerror(err))
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        loop = self._loop()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._owners.clear()

    def __len__(self) -> int:
        return len(self._owners)

    def _dispatch(self) -> None:
        owners = self._owners
        # Locals: globals looked up once a round, not once an event.
        reads, writes, wakes_in, wakes_out = IN, OUT, _WAKES_IN, _WAKES_OUT
        for fd, events in self._epoll.poll(0, _BATCH):
            try:  # a subscript, not .get(): no method call for every event
                owner = owners[fd]
            except KeyError:
                continue  # dropped by an earlier callback of this round
            if events & wakes_in and owner.polled & reads:
                owner.on_readable()
            # An owner dropped by that callback has `polled` 0 (no second dict lookup needed).
            if events & wakes_out and owner.polled & writes:
                owner.on_writable()


class _ConnectWaiter:
    """Interest in one connecting socket's writability, reported once: `done` is True when the
    report came with EPOLLERR or EPOLLHUP (the connect may have failed: SO_ERROR tells)."""

    __slots__ = ("done", "fd", "polled", "poller")

    # Filled in by Poller.connect.
    poller: Poller
    fd: int
    done: asyncio.Future[bool]
    polled: int

    def on_readable(self) -> None:
        # Only EPOLLERR/EPOLLHUP get here (the kernel watches OUT alone): noted, then as
        # writable (which leaves `polled` 0, so the dispatch does not call that again).
        if not self.done.done():
            self.done.set_result(True)
        self.on_writable()

    def on_writable(self) -> None:
        # The kernel disabled the fd (one-shot): it stays in the epoll set, dormant.
        poller = self.poller
        del poller._owners[self.fd]
        self.polled = 0
        poller._dormant.add(self.fd)
        if not self.done.done():
            self.done.set_result(False)


# A loop that is gone takes its poller (and the epoll fd) with it.
_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller] = weakref.WeakKeyDictionary()


def poller(loop: asyncio.AbstractEventLoop) -> Poller:
    """The loop's poller, made on first use."""
    found = _pollers.get(loop)
    if found is None:
        found = _pollers[loop] = Poller(loop)
    return found
