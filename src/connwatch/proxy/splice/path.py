"""SplicePath: a listener's splice data path (taking over accepted sockets, reaching targets)."""

from __future__ import annotations

import _socket
import asyncio
import errno
import functools
import socket
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from connwatch.proxy.splice.pipes import NO_FDS, PipePool, note_fd_pressure, pipe_pool
from connwatch.proxy.splice.poller import Poller, poller
from connwatch.proxy.splice.transport import SpliceTransport

if TYPE_CHECKING:
    from connwatch._types import Address
    from connwatch.config import ListenerConfig
    from connwatch.proxy.sockopts import SocketOptions
    from connwatch.proxy.upstream import Target, UpstreamPool

__all__ = ["MAX_CHUNK", "SplicePath", "open_socket"]

MAX_CHUNK: Final = 1024 * 1024  # bytes per splice at most: the default pipe-max-size of Linux
_STREAM: Final = socket.SOCK_STREAM | socket.SOCK_NONBLOCK  # made so: no call to make it so
_S = TypeVar("_S", bound=_socket.socket)


class _Owner(Protocol):
    """What SplicePath reads from its listener. The config and options as the path is made (a
    reload makes a new path: Listener.reconfigure), the pool at each connect."""

    @property
    def pool(self) -> UpstreamPool: ...

    @property
    def config(self) -> ListenerConfig: ...

    @property
    def upstream_options(self) -> SocketOptions: ...


class _Settings:
    """What every connection of a listener's config gets, worked out once (not per transport):
    the chunk, its pipe pool, the loop's poller (`poller()` is a weak-dict lookup, two Python
    calls), the upstream options and opener."""

    __slots__ = ("chunk", "config", "loop", "opener", "options", "pipes", "poller")

    def __init__(
        self, owner: _Owner, loop: asyncio.AbstractEventLoop, pipes: PipePool | None
    ) -> None:
        self.config = owner.config
        self.options = owner.upstream_options
        self.loop = loop
        self.chunk = min(self.config.buffer_size, MAX_CHUNK)
        # None: the process's pool for the listener's chunk size
        self.pipes = pipes if pipes is not None else pipe_pool(self.chunk)
        self.poller = poller(loop)
        # A partial of positional arguments: no Python frame of its own and no keyword
        # merging when the upstream pool calls it. The socket is the C one under socket.socket:
        # it lives only in its transport, which needs nothing of the Python class, and its
        # Python __init__ is ~2.5k instructions a connect.
        self.opener: Callable[[Address], Coroutine[Any, Any, _socket.socket]] = functools.partial(
            _open, _socket.socket, _not_default(self.options), self.poller
        )


def _not_default(options: SocketOptions) -> SocketOptions:
    """`options` less those a new socket already has (0 for an option that is off by default,
    e.g. TCP_USER_TIMEOUT 0: "the kernel default"): a setsockopt call each, for nothing."""
    return tuple(o for o in options if o[2] or (o[0], o[1]) not in _ZERO_BY_DEFAULT)


_ZERO_BY_DEFAULT: Final = frozenset(
    (level, option)
    for level, name in (
        (socket.SOL_SOCKET, "SO_KEEPALIVE"),
        (socket.IPPROTO_TCP, "TCP_NODELAY"),
        (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT"),
    )
    if (option := getattr(socket, name, None)) is not None
)


class SplicePath:
    """A listener's splice data path. It stands in for the loop when an accepted socket is taken
    over (`connect_accepted_socket`) and for the upstream pool when a target is reached
    (`connect`), with the same signatures, so the listener's own sequence stays as it is."""

    def __init__(self, owner: _Owner, pipes: PipePool | None = None) -> None:
        """Made on the loop it serves (its listener's), when the listener starts or reloads:
        the settings are worked out here, once, not checked for every connection."""
        self._owner = owner
        self._made = _Settings(owner, asyncio.get_running_loop(), pipes)

    def take_over(self, leg: asyncio.BaseProtocol, sock: _socket.socket) -> SpliceTransport:
        """Wrap an accepted, non-blocking client socket now, for `leg` (a connection leg):
        nothing to wait for on this path, so a caller need not await."""
        made = self._made
        protocol: Any = leg  # a connection leg (no cast(): a Python call for every leg)
        return SpliceTransport(made.loop, sock, protocol, made.pipes, made.chunk, made.poller)

    async def connect_accepted_socket(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], sock: _socket.socket
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        """As the loop's: `take_over` for callers that hold either."""
        protocol = protocol_factory()
        return self.take_over(protocol, sock), protocol

    async def connect(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        *,
        timeout: float,
        attempts: int,
        order: list[Target] | None = None,
        task: asyncio.Task[Any] | None = None,
    ) -> tuple[asyncio.Transport, Target]:
        """As `UpstreamPool.connect`, with a raw socket (options set before it connects).
        `task`: the task this runs in, when the caller holds it (else the pool asks for it)."""
        made = self._made
        sock, target = await self._owner.pool.reach(
            made.opener, timeout=timeout, attempts=attempts, order=order, task=task, loop=made.loop
        )
        leg: Any = protocol_factory()  # a connection leg
        transport = SpliceTransport(made.loop, sock, leg, made.pipes, made.chunk, made.poller)
        return transport, target


def open_socket(
    address: Address, options: SocketOptions = (), polled: Poller | None = None
) -> Coroutine[Any, Any, socket.socket]:
    """A connected non-blocking stream socket to `address`, with `options` (keep-alive,
    TCP_NODELAY) set on a TCP socket before it connects: a plain socket, so no per-call wrapper.
    `polled`: the running loop's poller, when the caller has it at hand.

    Not a coroutine itself: a numeric address gives the connecting coroutine straight away (one
    coroutine frame fewer for every upstream connect)."""
    return _open(socket.socket, options, polled, address)


def _open(
    kind: type[_S], options: SocketOptions, polled: Poller | None, address: Address
) -> Coroutine[Any, Any, _S]:
    """`kind`: the socket class made (socket.socket for whoever may use it as one)."""
    if address.path is not None:
        return _connect(kind, socket.AF_UNIX, address.path, (), polled)
    host = address.host or "127.0.0.1"
    family = _numeric_family(host)
    if family is not None:
        return _connect(kind, family, (host, address.port), options, polled)
    return _resolve_and_connect(kind, host, address.port, options, polled)


async def _resolve_and_connect(
    kind: type[_S], host: str, port: int, options: SocketOptions, polled: Poller | None
) -> _S:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(errno.EHOSTUNREACH, f"{host} has no address")
    error: OSError | None = None
    for family, _, _, _, addr in infos:
        try:
            return await _connect(kind, family, addr, options, polled)
        except OSError as exc:
            error = exc
    assert error is not None
    raise error


def _connect(
    kind: type[_S], family: int, addr: Any, options: SocketOptions, polled: Poller | None
) -> Coroutine[Any, Any, _S]:
    """The socket made and its options set here; the connect is the coroutine returned."""
    try:
        sock = kind(family, _STREAM)
    except OSError as exc:
        # Out of descriptors: idle pooled pipes go before a connection does.
        if exc.errno not in NO_FDS or not note_fd_pressure():
            raise
        sock = kind(family, _STREAM)
    setsockopt = sock.setsockopt
    for level, option, value in options:
        # An option the kernel refuses is skipped, the others still set (as sockopts does);
        # try/except, not contextlib.suppress: three Python calls an option fewer.
        try:  # noqa: SIM105
            setsockopt(level, option, value)
        except OSError:
            pass
    if polled is None:
        polled = poller(asyncio.get_running_loop())
    return polled.connect(sock, addr)  # which closes sock if the connect fails


@functools.lru_cache(maxsize=256)  # a C call when cached: hosts are the configured targets
def _numeric_family(host: str) -> int | None:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None
