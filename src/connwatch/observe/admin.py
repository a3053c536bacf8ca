"""The admin HTTP endpoint: /metrics /healthz /readyz /connections (SPEC section 4)."""

from __future__ import annotations

import hmac
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

from connwatch._types import Address
from connwatch.observe.clients import DEFAULT_LIMIT, SORTS
from connwatch.observe.metrics import render

_MAX_REQUEST = 16 * 1024  # bytes of headers or body: the admin API takes no large input
_IDLE_TIMEOUT = 10.0  # seconds a connection may wait for a complete request (slowloris bound)

# aiohttp logs every malformed request with a traceback through stdlib logging, which would go
# to stderr unformatted: a local client could flood it. The client gets its 400; we log nothing.
_quiet = logging.getLogger("connwatch.admin.http")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@web.middleware
async def _bounded_head(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse request heads over _MAX_REQUEST in total (aiohttp bounds each line, not the sum)."""
    if sum(len(k) + len(v) for k, v in request.raw_headers) > _MAX_REQUEST:
        return _error(431, f"request headers exceed {_MAX_REQUEST} bytes")
    return await handler(request)


class AdminBackend(Protocol):
    """What the admin endpoint reads from the daemon (one process or many workers)."""

    @property
    def registry(self) -> CollectorRegistry: ...

    async def refresh_metrics(self) -> None: ...

    async def connection_records(
        self, listener: str | None, min_idle: float | None, limit: int | None
    ) -> list[dict[str, Any]]: ...

    async def readiness(self) -> tuple[bool, dict[str, Any]]: ...

    async def close_connection(self, conn_id: str) -> bool: ...

    async def client_records(
        self, listener: str | None, sort: str, limit: int
    ) -> list[dict[str, Any]]: ...
    async def upstreams(self, listener: str | None = None) -> dict[str, Any]: ...


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class AdminApp:
    """aiohttp application serving one backend; `token` guards mutating endpoints."""

    def __init__(self, backend: AdminBackend, token: str | None) -> None:
        self.backend = backend
        self.token = token
        self.app = web.Application(client_max_size=_MAX_REQUEST, middlewares=[_bounded_head])
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/connections", self.connections)
        self.app.router.add_delete("/connections/{conn_id}", self.delete_connection)
        self.app.router.add_get("/clients", self.clients)
        self.app.router.add_get("/upstreams", self.upstreams)
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        # more /healthz fields while something is under way (e.g. `upgrade`); none by default
        self.health_details: Callable[[], dict[str, Any]] | None = None

    async def start(self, address: Address, *, sock: socket.socket | None = None) -> None:
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            max_line_size=8190,
            max_field_size=8190,
            keepalive_timeout=_IDLE_TIMEOUT,
            logger=_quiet,
        )
        await self._runner.setup()
        if sock is not None:
            self._site = web.SockSite(self._runner, sock)
        elif address.path is not None:
            self._site = web.UnixSite(self._runner, address.path)
        else:
            self._site = web.TCPSite(
                self._runner, address.host or None, address.port, reuse_address=True
            )
        await self._site.start()

    async def start_on_socket(self, sock: socket.socket) -> None:
        """Serve on a listening socket taken over from an old process (seamless upgrade)."""
        await self.start(Address("", 0), sock=sock)

    def listening_sockets(self) -> list[socket.socket]:
        """The admin listening sockets (to hand them to a successor)."""
        server = getattr(self._site, "_server", None)
        return list(getattr(server, "sockets", None) or ())

    @property
    def port(self) -> int:
        assert self._runner is not None
        for addr in self._runner.addresses:
            if isinstance(addr, tuple):
                return int(addr[1])
        return 0

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers -------------------------------------------------------------------------------
    async def metrics(self, request: web.Request) -> web.Response:
        await self.backend.refresh_metrics()
        body, content_type = render(self.backend.registry, request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(self, request: web.Request) -> web.Response:
        details = self.health_details() if self.health_details is not None else {}
        return _json({"status": "UP", **details})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, body = await self.backend.readiness()
        return _json(body, 200 if ready else 503)

    async def connections(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            min_idle = float(query["min_idle"]) if "min_idle" in query else None
            limit = int(query["limit"]) if "limit" in query else None
        except ValueError:
            return _error(400, "min_idle must be a number of seconds and limit a whole number")
        if (limit is not None and limit < 0) or (min_idle is not None and min_idle < 0):
            return _error(400, "min_idle and limit must not be negative")
        records = await self.backend.connection_records(query.get("listener"), min_idle, limit)
        return _json(records)

    async def delete_connection(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "this endpoint needs 'Authorization: Bearer <admin.token>'")
        conn_id = request.match_info["conn_id"]
        if not await self.backend.close_connection(conn_id):
            return _error(404, f"no open connection with id {conn_id!r}")
        return _json({"id": conn_id, "status": "closing"}, 202)

    async def clients(self, request: web.Request) -> web.Response:
        """SPEC section 4 and 12: the busiest client keys per listener."""
        query = request.query
        sort = query.get("sort", "accepted")
        if sort not in SORTS:
            return _error(400, f"sort must be one of {', '.join(SORTS)}; got {sort!r}")
        raw_limit = query.get("limit", str(DEFAULT_LIMIT))
        if not raw_limit.isdigit():
            return _error(400, f"limit must be a whole number, 0 or more; got {raw_limit!r}")
        records = await self.backend.client_records(query.get("listener"), sort, int(raw_limit))
        return _json(records)

    async def upstreams(self, request: web.Request) -> web.Response:
        return _json(await self.backend.upstreams(request.query.get("listener")))

    def _authorized(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {self.token}"
        return hmac.compare_digest(given.encode(), expected.encode())
