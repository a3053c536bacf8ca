"""One listener: bind, accept, and wire each connection to an upstream, the tracker and liveness."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import structlog

from connwatch._types import (
    CloseReason,
    ConnectionLedger,
    ConnectionState,
    Direction,
    LivenessWatch,
    Throttle,
    UpstreamOutcomes,
    format_peer,
)
from connwatch.exceptions import ListenerError, NoHealthyUpstreamError, UpstreamConnectError
from connwatch.proxy.acceptor import Acceptor
from connwatch.proxy.binding import bind_tcp, bind_unix
from connwatch.proxy.client_limits import ClientLimiter
from connwatch.proxy.connection import SET_UP_TASK, MonitoredConnection
from connwatch.proxy.fd_watch import FdWatch
from connwatch.proxy.legs import ReadBuffer, Timeouts
from connwatch.proxy.passive_outcomes import OutcomeJudge
from connwatch.proxy.proxy_header import preface, read_header
from connwatch.proxy.sockopts import apply_to_fd, for_loop_socket, keepalive_options
from connwatch.proxy.splice import SplicePath, uses_splice
from connwatch.proxy.splice.path import open_socket
from connwatch.proxy.upstream import Target, UpstreamPool
from connwatch.proxy.warm_pool import WarmPool
from connwatch.snapshots import ListenerSnapshot, TargetStats
from connwatch.wire.proxy_protocol import ProxyHeader, ProxyProtocolError

if TYPE_CHECKING:
    from connwatch.config import ListenerConfig

log = structlog.get_logger("connwatch.listener")

_MAX_READ = 256 * 1024  # bytes per read: larger reads buy little once syscalls are amortised
PROXY_PROTOCOL = "proxy_protocol"  # the `kind` of connwatch_protocol_errors_total
_CONNECTING: Final = ConnectionState.CONNECTING  # a global: `Enum.X` is ~0.17 µs on 3.11
_OVER_MAX: Final = CloseReason.MAX_CONNECTIONS


class Listener:
    """Accepts clients on one address and proxies each to a target of its upstream pool."""

    def __init__(
        self,
        config: ListenerConfig,
        tracker: ConnectionLedger[MonitoredConnection],
        *,
        liveness: LivenessWatch[MonitoredConnection] | None = None,
        reuse_port: bool = False,
        outcomes: UpstreamOutcomes | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.tracker = tracker
        # ConnectionObserver.connection_accepted: the tracker's own, bound once (no relay call).
        self.connection_accepted: Callable[[MonitoredConnection], None] = tracker.accepted
        self._on_made = self._set_up  # bound once, not for every connection
        self.liveness = liveness
        self.reuse_port = reuse_port
        self.pool = UpstreamPool(config.upstreams, config.balance, config.slow_start)
        self.outcomes = outcomes  # passive health's sink, wired by the runtime
        self.judge: OutcomeJudge | None = None
        self._wire_passive()
        self.buffer = ReadBuffer(min(config.buffer_size, _MAX_READ))
        self._read_settings(config)
        self.clients = ClientLimiter(config.client_limits, self._open_keys)  # SPEC section 12
        self.accepting = False
        self.protocol_errors: Counter[str] = Counter()  # kind -> count, read by the daemon
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop  # the loop start() runs on
        self._acceptor: Acceptor | None = None
        self._fds: FdWatch | None = None  # the acceptor's: upstream fd numbers are shown to it
        self._inherited: list[Acceptor] = []  # more sockets taken over from an old process
        self._handed_over = False  # released to a successor: leave a Unix socket's path alone
        self._splice: SplicePath | None = None  # None: the portable data path
        self.warm: WarmPool | None = None  # warm upstream connections (upstream_pool.enabled)
        self._throttle = Throttle()  # repeating warnings: one line per 10 s, with a count
        self._log = log.bind(listener=self.name)
        # Its series exist from the start, at zero; admission reads their `active` (not a call)
        # and feeds their client view (`observe.tracker.ListenerTotals`).
        self._counts: Any = tracker.totals(self.name)
        self._refusing = 0  # refused over max_connections, still `active` till their loss

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound TCP port (useful after binding port 0); 0 for a Unix socket."""
        assert self._sock is not None
        name = self._sock.getsockname()
        return int(name[1]) if isinstance(name, tuple) else 0

    def statistics(self) -> ListenerSnapshot:
        """Socket, admission, protocol errors and targets, frozen (read at scrape time, /readyz)."""
        return ListenerSnapshot(
            self.name,
            self._sock is not None,
            self.accepting,
            self.config.health_check.enabled,
            dict(self.protocol_errors),
            tuple(self._target_statistics(t) for t in self.pool.targets),
        )

    def _target_statistics(self, target: Target) -> TargetStats:
        stats = target.statistics(self.name, self.config.slow_start)
        if self.warm is None:
            return stats
        return dataclasses.replace(stats, pool=self.warm.statistics(target.label))

    async def start(self) -> None:
        address = self.config.listen
        try:
            if address.path is not None:
                sock = bind_unix(address.path)
            else:
                sock = bind_tcp(address, reuse_port=self.reuse_port)
                self._set_client_options(sock)
        except OSError as exc:
            raise ListenerError(
                f"listener {self.name!r} cannot listen on {address}: {exc.strerror or exc}"
            ) from exc
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._splice = SplicePath(self) if uses_splice(self.config.data_path) else None
        self._acceptor = Acceptor(
            sock,
            self._accepted,
            self.name,
            on_shed=lambda: self.tracker.shed(self.name),
            factory=self._loop_factory(),
            plain=self._splice is not None,  # splice wraps plain sockets itself
        )
        self._fds = self._acceptor.fds
        self._acceptor.start()
        self.accepting = True
        self._configure_warm_pool()
        self._log_started()

    def stop_accepting(self) -> None:
        """Close the listening socket; open connections carry on."""
        self.accepting = False
        for extra in self._inherited:
            extra.close()
        self._inherited = []
        if self.warm is not None:  # no client will take a pooled socket now
            self.warm.close()
            self.warm = None
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
            if self.config.listen.path is not None and not self._handed_over:
                with contextlib.suppress(OSError):
                    os.unlink(self.config.listen.path)

    # -- seamless upgrade (runtime/upgrade/) ----------------------------------------------------
    async def start_inherited(self, socks: list[socket.socket]) -> None:
        """Start accepting on listening sockets taken over from an old process (the same open
        sockets, so clients waiting in their backlogs are accepted here) instead of binding."""
        first, *rest = socks
        self._sock = first
        self._loop = asyncio.get_running_loop()
        self._splice = SplicePath(self) if uses_splice(self.config.data_path) else None
        shed = lambda: self.tracker.shed(self.name)  # noqa: E731
        self._acceptor = Acceptor(first, self._accepted, self.name, on_shed=shed)
        self._acceptor.serve_with(self._loop_factory(), plain=self._splice is not None)
        self._fds = self._acceptor.fds
        self._inherited = [Acceptor(s, self._accepted, self.name, on_shed=shed) for s in rest]
        for acceptor in (self._acceptor, *self._inherited):
            acceptor.sock.setblocking(False)
            acceptor.start()
        self.accepting = True
        self._log_started(inherited_sockets=len(socks))

    def _log_started(self, **extra: Any) -> None:
        address = self.config.listen
        self._log.info(
            "listener_started",
            listen=str(address),
            port=self.port if not address.path else None,
            data_path="splice" if self._splice else "portable",
            upstreams=[t.label for t in self.pool.targets],
            **extra,
        )

    def listening_sockets(self) -> list[socket.socket]:
        """The sockets this listener accepts on (to hand them to a successor)."""
        return [a.sock for a in ([self._acceptor] if self._acceptor else []) + self._inherited]

    def release(self) -> None:
        """Stop accepting for a successor holding the same sockets: only this process's fds
        close (the sockets and their backlogs live on there); a Unix socket's path stays."""
        self._handed_over = True
        self.stop_accepting()

    def reconfigure(self, config: ListenerConfig) -> None:
        """Apply a reloaded config to new connections (a new address makes a new listener)."""
        old_targets = {t.label: t for t in self.pool.targets}
        self.config = config
        self.pool = UpstreamPool(config.upstreams, config.balance, config.slow_start)
        self.pool.targets = [old_targets.get(t.label, t) for t in self.pool.targets]
        self._wire_passive()
        self.buffer = ReadBuffer(min(config.buffer_size, _MAX_READ))
        self._read_settings(config)
        self.clients.configure(config.client_limits)
        self._splice = SplicePath(self) if uses_splice(config.data_path) else None
        if self._acceptor is not None:
            self._acceptor.serve_with(self._loop_factory(), plain=self._splice is not None)
        if self._sock is not None and config.listen.path is None:
            self._set_client_options(self._sock)
        if self.accepting:
            self._configure_warm_pool()

    def _set_client_options(self, sock: socket.socket) -> None:
        """Keep-alive and TCP_NODELAY, which every accepted socket inherits on Linux."""
        apply_to_fd(sock.fileno(), sock.family, keepalive_options(self.config.keepalive.client))

    def _read_settings(self, config: ListenerConfig) -> None:
        """Settings read per connection, as plain attributes (a pydantic one: ~27 ns more)."""
        self._max_connections = config.max_connections
        self._accept_proxy = config.proxy_protocol.accept
        self._send_proxy = config.proxy_protocol.send
        self._connect_timeout = config.connect_timeout
        self._connect_attempts = config.connect_attempts
        self.timeouts = Timeouts(
            config.idle_timeout, config.half_close_timeout, config.max_lifetime
        )
        self.upstream_options = keepalive_options(config.keepalive.upstream)
        self._transport_options = for_loop_socket(self.upstream_options)  # the loop's sockets

    # -- warm upstream connections (SPEC section 9) ---------------------------------------------
    def _configure_warm_pool(self) -> None:
        """Start, adjust or close the warm pool to match the config (start and reload)."""
        config = self.config
        if not config.upstream_pool.enabled:
            if self.warm is not None:
                self.warm.close()
                self.warm = None
            return
        timeouts = {
            "connect_timeout": config.connect_timeout,
            "probe_timeout": config.health_check.timeout,
        }
        if self.warm is not None:
            self.warm.set_timeouts(**timeouts)
            self.warm.reconfigure(config.upstream_pool, self.pool.targets)
            return
        self.warm = WarmPool(
            self.name,
            config.upstream_pool,
            opener=lambda address: open_socket(address, self.upstream_options),
            **timeouts,
        )
        self.warm.start(self.pool.targets)

    def target_state_changed(self, target: Target) -> None:
        """A target turned DOWN or back: its warm pool is emptied or refilled at once."""
        if self.warm is not None:
            self.warm.target_changed(target)

    async def _borrow_or_connect(
        self, conn: MonitoredConnection, warm: WarmPool
    ) -> tuple[asyncio.Transport, Target]:
        """A pooled socket to the target balancing picks, wrapped for this connection's data
        path; on a miss, a connect as without a pool (same balancing order)."""
        order = self.pool.candidates()
        if not order:
            raise NoHealthyUpstreamError("every upstream target is DOWN")
        sock = warm.take(order[0])
        if sock is not None:
            wrapper = self._splice or self._loop
            try:
                transport, _ = await wrapper.connect_accepted_socket(conn.upstream_protocol, sock)
            except OSError:
                sock.close()
            else:
                return transport, order[0]
        if self._splice is not None:
            return await self._splice.connect(
                conn.upstream_protocol,
                timeout=self._connect_timeout,
                attempts=self._connect_attempts,
                order=order,
            )
        return await self.pool.connect(
            conn.upstream_protocol,
            timeout=self._connect_timeout,
            attempts=self._connect_attempts,
            options=self._transport_options,
            order=order,
            fds=self._fds,
            loop=self._loop,
        )

    def _wire_passive(self) -> None:
        """One OutcomeJudge while `outlier_detection.enabled` (kept across reloads, so that open
        connections are still judged), none otherwise."""
        cfg = self.config.outlier_detection
        if cfg.enabled and self.outcomes is not None:
            if self.judge is None:
                self.judge = OutcomeJudge(self.name, cfg.early_window, self.outcomes)
            self.judge.early_window = cfg.early_window
        elif self.judge is not None:
            self.judge.close()
            self.judge = None
        self.pool.on_connect_failure = self.judge.connect_failed if self.judge is not None else None

    # -- accepting ------------------------------------------------------------------------------
    def _loop_factory(self) -> Callable[[], asyncio.Protocol] | None:
        return self._made if self._splice is None else None  # splice wraps its own sockets

    def _made(self) -> asyncio.Protocol:
        """A client the loop's server accepts; set-up starts once its leg is made."""
        conn = MonitoredConnection(
            self.tracker.next_id(), self.name, self.buffer, self, self.timeouts
        )
        conn.on_made = self._on_made
        return conn.client_leg

    def _accepted(self, sock: Any, peer: Any) -> None:  # plain_sockets: socket.socket or not
        conn = MonitoredConnection(
            self.tracker.next_id(), self.name, self.buffer, self, self.timeouts
        )
        conn.client = format_peer(peer)  # as getpeername() would say, without asking again
        # The set-up task (as client_made makes a loop server client's); splice wraps at once
        # (nothing to await), so its task is `_set_up` itself: a coroutine fewer at each step.
        if (splice := self._splice) is None:
            serve = self._serve(conn, sock, peer)
        else:
            try:
                splice.take_over(conn.client_leg, sock)
            except OSError:
                sock.close()  # the client left before we could wrap its socket
                return
            serve = self._on_made(conn, peer)
        conn.connect_task = asyncio.Task(serve, name=SET_UP_TASK)

    async def _serve(self, conn: MonitoredConnection, sock: Any, peer: Any) -> None:
        """Our accept loop's client on the loop's transports, as its task: wrap, `_set_up`."""
        try:
            try:
                await self._loop.connect_accepted_socket(lambda: conn.client_leg, sock)
            except OSError:
                sock.close()  # the client left before we could wrap its socket
                return
            await self._set_up(conn, peer)
        finally:
            conn.connect_task = None

    # -- ConnectionObserver ---------------------------------------------------------------------
    def connection_opened(self, conn: MonitoredConnection) -> None:
        # Open connections per target, for least-connections balancing (the pool's).
        if (target := conn.target) is not None:
            target.active += 1
        self.tracker.connection_opened(conn)
        if self.liveness is not None:
            self.liveness.watch(conn)
        if self.judge is not None:
            self.judge.opened(conn)

    def connection_closed(self, conn: MonitoredConnection) -> None:
        if conn.reason is _OVER_MAX:  # (only admission closes for it)
            self._refusing -= 1
        if self.liveness is not None:
            self.liveness.unwatch(conn)
        if self.judge is not None:
            self.judge.closed(conn)
        self.tracker.connection_closed(conn)
        if (target := conn.target) is not None and target.active > 0:  # set once opened
            target.active -= 1
        if (key := conn.client_key) is not None and (clients := self.clients).counting:
            conn.client_key = None  # its slot of the client limits goes, once
            clients.release(key)

    def _open_keys(self) -> Iterator[str | None]:  # its open connections' keys, for the limiter
        for c in self.tracker.connections(self.name):
            if isinstance(c, MonitoredConnection) and c.observer is self:
                yield c.client_key

    def flow_paused(self, conn: MonitoredConnection, direction: Direction) -> None:
        self.tracker.flow_paused(conn, direction)

    # -- PROXY protocol header from the client ---------------------------------------------------
    async def _read_proxy_header(self, conn: MonitoredConnection) -> ProxyHeader | None:
        """Wait for the client's PROXY header (within connect_timeout); None closes the client."""
        try:
            header = await read_header(conn, self._connect_timeout)
        except (TimeoutError, ProxyProtocolError) as exc:
            self.protocol_errors[PROXY_PROTOCOL] += 1
            if (suppressed := self._throttle.allow(PROXY_PROTOCOL)) is not None:
                self._log.warning(
                    "protocol_error",
                    conn_id=conn.id,
                    kind=PROXY_PROTOCOL,
                    client=conn.client,
                    error=str(exc) or "no PROXY header in time",
                    suppressed=suppressed,
                )
            conn.close(CloseReason.PROTOCOL_ERROR, abort=True)
            return None
        if header.source is not None:
            conn.client = format_peer(header.source)
        return header

    # -- upstream connect -----------------------------------------------------------------------
    async def _set_up(self, conn: MonitoredConnection, peer: Any) -> None:
        """Admit a client whose transport is made (one closed in connection_made never reports
        its loss), reach an upstream: a loop-accepted client's task (`conn.connect_task`, let go
        at the end); one frame, not two, at every step. Refused over max_connections or while
        draining (accepted just before a hand-over to a successor: served here), else the
        client limits apply (inline: one frame), with PROXY protocol to the header's address."""
        try:
            draining = not self.accepting and not self._handed_over
            if self._counts.active - self._refusing > self._max_connections or draining:
                conn.close(CloseReason.SHUTDOWN if draining else _OVER_MAX, abort=True)
                if conn.reason is _OVER_MAX:  # (not if it had closed already)
                    self._refusing += 1
                return
            if conn.state is not _CONNECTING:
                return
            header = None
            if self._accept_proxy:  # the client is the header's address, once read
                header = await self._read_proxy_header(conn)
                if header is None or conn.state is not _CONNECTING:
                    return
                if header.source is not None:
                    peer = header.source
            # Over a client limit it closes (`client_limit`); seen in the client view either way.
            key, over = self.clients.admit_peer(peer, conn.opened_at)
            self._counts.clients.seen(key, over, conn.opened_wall)
            if over is not None:
                conn.close(CloseReason.CLIENT_LIMIT, abort=True)
                return
            conn.client_key = key
            try:
                if self.warm is not None:
                    transport, target = await self._borrow_or_connect(conn, self.warm)
                elif self._splice is not None:  # sets its own socket options before connecting
                    transport, target = await self._splice.connect(
                        conn.upstream_protocol,
                        timeout=self._connect_timeout,
                        attempts=self._connect_attempts,
                        task=conn.connect_task,
                    )
                else:
                    transport, target = await self.pool.connect(
                        conn.upstream_protocol,
                        timeout=self._connect_timeout,
                        attempts=self._connect_attempts,
                        options=self._transport_options,
                        fds=self._fds,
                        task=conn.connect_task,
                        loop=self._loop,
                    )
            except (NoHealthyUpstreamError, UpstreamConnectError) as exc:
                self._connect_failed(conn, exc)
                return
            if conn.state is not _CONNECTING:  # the client left while we were connecting
                transport.abort()
                return
            if self.timeouts.max_lifetime:
                jitter = random.uniform(0.9, 1.1)  # spreads deadlines; not security
                conn.lifetime_deadline = time.monotonic() + self.timeouts.max_lifetime * jitter
            send = self._send_proxy  # "none", "v1" or "v2"
            conn.upstream_connected(target, b"" if send == "none" else preface(send, conn, header))
            if (acceptor := self._acceptor) is not None and acceptor.burst:
                acceptor.served()
        finally:
            conn.connect_task = None

    def _connect_failed(self, conn: MonitoredConnection, exc: Exception) -> None:
        if not isinstance(exc, UpstreamConnectError):  # NoHealthyUpstreamError
            conn.close(CloseReason.NO_HEALTHY_UPSTREAM)
            return
        conn.close(CloseReason.UPSTREAM_CONNECT_FAILED)
        if exc.out_of_fds and self._acceptor is not None:
            # No fds left for upstream legs: stop taking clients we cannot serve.
            self._acceptor.exhausted(OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
        elif (suppressed := self._throttle.allow("upstream_connect_failed")) is not None:
            self._log.warning(
                "upstream_connect_failed",
                conn_id=conn.id,
                error=str(exc),
                suppressed=suppressed,
            )
