"""A client's PROXY protocol header (SPEC section 7): read before the upstream connect, and the
header connwatch sends its upstream. Used by the listener only when `proxy_protocol` is set."""

from __future__ import annotations

import asyncio

from connwatch.exceptions import IncompleteError
from connwatch.proxy.connection import MonitoredConnection
from connwatch.wire import proxy_protocol
from connwatch.wire.proxy_protocol import ProxyHeader, ProxyProtocolError


async def read_header(conn: MonitoredConnection, timeout: float) -> ProxyHeader:
    """The client's PROXY header, within `timeout`; client reading is paused once it is read.

    Raises TimeoutError or ProxyProtocolError (the caller closes the connection)."""
    parsed: asyncio.Future[ProxyHeader] = asyncio.get_running_loop().create_future()

    def offer(c: MonitoredConnection) -> None:
        try:
            header, used = proxy_protocol.parse(c.peek_held())
        except IncompleteError:
            return
        except ProxyProtocolError as exc:
            if not parsed.done():
                parsed.set_exception(exc)
            return
        c.consume_held(used)
        c.preamble = None
        transport = c.client_transport()
        if transport is not None:
            transport.pause_reading()
        if not parsed.done():
            parsed.set_result(header)

    conn.preamble = offer
    offer(conn)  # the header may have come with the first segment, held before now
    transport = conn.client_transport()
    if transport is not None and not parsed.done():
        transport.resume_reading()
    try:
        async with asyncio.timeout(timeout):
            return await parsed
    finally:
        conn.preamble = None


def preface(version: str, conn: MonitoredConnection, header: ProxyHeader | None) -> bytes:
    """The PROXY header (`version` "v1"/"v2") to send the upstream ahead of the client's bytes:
    what the client's own proxy said, else the client connection's addresses."""
    if header is not None and header.source is not None:  # what the client's proxy said
        return proxy_protocol.header_for(version, header.source, header.destination)
    transport = conn.client_transport()
    peer = transport.get_extra_info("peername") if transport else None
    local = transport.get_extra_info("sockname") if transport else None
    if not (isinstance(peer, tuple) and isinstance(local, tuple)):
        return proxy_protocol.header_for(version, None, None)  # Unix socket: UNKNOWN/LOCAL
    return proxy_protocol.header_for(version, peer[:2], local[:2])
