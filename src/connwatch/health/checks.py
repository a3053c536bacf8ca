"""One active health check now: `tcp`, `http`, `send_expect` or `heartbeat` (SPEC sections 3, 7, 8).

`run_check(address, cfg)` runs one `cfg.type` check bounded by `cfg.timeout` and reports the
outcome as a `CheckResult`; it never raises (cancellation aside). The daemon's `HealthMonitor`
(health.py) runs it on a schedule; `connwatch probe` calls it once.

Choices:

* `https` checks do not verify the certificate or the host name: a health check asks "is it
  alive", not "is it trustworthy", and self-signed certificates on internal ports are common.
* `cfg.port` replaces the port of a TCP target; a Unix-socket target is checked over its socket
  and `port` does not apply to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import structlog

from connwatch import __version__
from connwatch._types import Address
from connwatch.config import HealthCheckConfig
from connwatch.exceptions import describe_error
from connwatch.health.heartbeat_io import close_writer, exchange
from connwatch.wire.heartbeat_frame import (
    FRAME_SIZE,
    FrameDecoder,
    FrameError,
    FrameType,
    decode,
    ping,
)

__all__ = ["MAX_REPLY", "CheckResult", "ProtocolErrorCallback", "run_check"]

log = structlog.get_logger("connwatch.checks")

MAX_REPLY = 64 * 1024  # bytes read from a send_expect reply, or of an HTTP status line + headers
_MAX_HEADERS = 100
_CLOSE_GRACE = 0.5  # seconds a closing check socket may take before it is aborted

ProtocolErrorCallback = Callable[[str], None]
"""Called with the `kind` (`heartbeat_frame`) when a check target breaks a protocol."""


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    latency_s: float  # the whole check; for `heartbeat` the PING/PONG round trip
    detail: str  # what was seen, for logs and `connwatch probe`


class _Failed(Exception):
    """A check got an answer and the answer is wrong (the detail says how)."""


@dataclass
class _Progress:
    """How far a check got, so a timeout can say where it stopped."""

    stage: str = "connecting"
    received: bytes = b""

    def describe(self) -> str:
        got = f", got {len(self.received)} bytes {_preview(self.received)}" if self.received else ""
        return f"{self.stage}{got}"


_Check = Callable[[Address, HealthCheckConfig, _Progress], Awaitable[tuple[str, float | None]]]


async def run_check(
    address: Address,
    cfg: HealthCheckConfig,
    *,
    on_protocol_error: ProtocolErrorCallback | None = None,
) -> CheckResult:
    """Run one `cfg.type` check against `address` now. Never raises, except CancelledError."""
    target = address if address.is_unix or cfg.port is None else replace(address, port=cfg.port)
    progress = _Progress()
    started = time.perf_counter()
    try:
        async with asyncio.timeout(cfg.timeout):
            detail, latency = await _CHECKS[cfg.type](target, cfg, progress)
    except TimeoutError as exc:
        if getattr(exc, "errno", None):  # a kernel ETIMEDOUT, not our deadline
            return _failure(started, _describe_os_error(exc))
        return _failure(started, f"timed out after {cfg.timeout:g}s while {progress.describe()}")
    except FrameError as exc:
        _report(on_protocol_error, "heartbeat_frame")
        return _failure(started, f"bad heartbeat frame: {exc}")
    except _Failed as exc:
        return _failure(started, str(exc))
    except OSError as exc:
        return _failure(started, _describe_os_error(exc))
    except Exception as exc:  # the contract is a result, whatever the peer does
        return _failure(started, f"{type(exc).__name__}: {exc}")
    elapsed = time.perf_counter() - started
    return CheckResult(True, elapsed if latency is None else latency, detail)


def _failure(started: float, detail: str) -> CheckResult:
    return CheckResult(False, time.perf_counter() - started, detail)


def _report(callback: ProtocolErrorCallback | None, kind: str) -> None:
    if callback is None:
        return
    try:
        callback(kind)
    except Exception:  # a faulty counter must not turn a check result into a crash
        log.exception("protocol_error_callback_failed", kind=kind)


def _describe_os_error(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    return describe_error(exc)


def _preview(data: bytes, limit: int = 40) -> str:
    return repr(data[:limit]) + ("..." if len(data) > limit else "")


@contextlib.asynccontextmanager
async def _connected(
    address: Address,
    progress: _Progress,
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A stream to `address` (TCP or Unix socket), closed on the way out whatever happens."""
    progress.stage = "connecting"
    if address.path is not None:
        reader, writer = await asyncio.open_unix_connection(
            address.path, ssl=tls, server_hostname=server_hostname if tls else None
        )
    else:
        reader, writer = await asyncio.open_connection(
            address.host or "127.0.0.1",
            address.port,
            ssl=tls,
            server_hostname=server_hostname if tls else None,
        )
    try:
        yield reader, writer
    finally:
        await close_writer(writer, _CLOSE_GRACE)


async def _tcp(address: Address, cfg: HealthCheckConfig, progress: _Progress) -> tuple[str, None]:
    async with _connected(address, progress):
        return "connected", None


async def _send_expect(
    address: Address, cfg: HealthCheckConfig, progress: _Progress
) -> tuple[str, None]:
    spec = cfg.send_expect
    async with _connected(address, progress) as (reader, writer):
        if spec.send_bytes:
            progress.stage = "sending"
            writer.write(spec.send_bytes)
            await writer.drain()
        progress.stage = "waiting for the expected reply"
        reply = b""
        while not spec.matches(reply):
            if len(reply) >= MAX_REPLY:
                raise _Failed(f"no match for {spec.expect!r} in the first {MAX_REPLY} bytes")
            chunk = await reader.read(MAX_REPLY - len(reply))
            if not chunk:
                raise _Failed(
                    f"peer closed after {len(reply)} bytes {_preview(reply)}; "
                    f"expected {spec.expect!r}"
                )
            reply += chunk
            progress.received = reply
        return f"reply matched {spec.expect!r}", None


async def _http(address: Address, cfg: HealthCheckConfig, progress: _Progress) -> tuple[str, None]:
    spec = cfg.http
    host_header = spec.host or ("localhost" if address.is_unix else str(address))
    if any(c in spec.path for c in " \r\n") or any(c in host_header for c in "\r\n"):
        raise _Failed("the path or Host header contains a space or line break")
    tls = _insecure_tls() if spec.scheme == "https" else None
    sni = _sni(spec.host, address)
    async with _connected(address, progress, tls=tls, server_hostname=sni) as (reader, writer):
        progress.stage = "sending the request"
        writer.write(
            f"GET {spec.path} HTTP/1.1\r\nHost: {host_header}\r\n"
            f"User-Agent: connwatch-health/{__version__}\r\nAccept: */*\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        progress.stage = "waiting for the status line"
        status, reason = _status_line(await _head_line(reader, MAX_REPLY))
        progress.stage = f"reading the headers after {status}"
        await _skip_headers(reader)
    text = f"HTTP {status} {reason}".rstrip()
    if not spec.status_ok(status):
        raise _Failed(f"{text}; expected {spec.expected_status}")
    return text, None


def _insecure_tls() -> ssl.SSLContext:
    """TLS without certificate checks: a liveness check, not an authentication (module doc)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _sni(host_header: str | None, address: Address) -> str:
    """The TLS server name: the configured Host (without its port), else the target's host.

    "" sends none: right for IP literals and Unix sockets (nothing is verified anyway)."""
    if host_header:
        name = _strip_port(host_header)
    elif address.is_unix:
        return ""
    else:
        name = address.host
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return ""


def _strip_port(host: str) -> str:
    """`example.com:8443` -> `example.com`, `[::1]:443` -> `::1`; a bare IPv6 stays whole."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    name, sep, port = host.rpartition(":")
    return name if sep and ":" not in name and port.isdigit() else host


async def _head_line(reader: asyncio.StreamReader, budget: int) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        what = f"after {_preview(exc.partial)}" if exc.partial else "without a response"
        raise _Failed(f"peer closed {what}") from None
    except asyncio.LimitOverrunError:
        raise _Failed("response line longer than the reader's limit") from None
    if len(line) > budget:
        raise _Failed(f"response head longer than {MAX_REPLY} bytes")
    return line


def _status_line(line: bytes) -> tuple[int, str]:
    parts = line.decode("latin-1").strip().split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise _Failed(f"not an HTTP response: {_preview(line)}")
    return int(parts[1]), parts[2] if len(parts) > 2 else ""


async def _skip_headers(reader: asyncio.StreamReader) -> None:
    """Read up to the blank line ending the head, bounded in count and size; body is ignored."""
    budget = MAX_REPLY
    for _ in range(_MAX_HEADERS):
        line = await _head_line(reader, budget)
        if line in (b"\r\n", b"\n"):
            return
        budget -= len(line)
    raise _Failed(f"more than {_MAX_HEADERS} header lines")


async def _heartbeat(
    address: Address, cfg: HealthCheckConfig, progress: _Progress
) -> tuple[str, float]:
    progress.stage = "exchanging PING/PONG"
    if address.path is not None:
        rtt = await _unix_exchange(address, progress)
    else:
        rtt = await exchange(address.host or "127.0.0.1", address.port, timeout=cfg.timeout)
    return f"PONG in {rtt * 1000:.3f}ms", rtt


async def _unix_exchange(address: Address, progress: _Progress) -> float:
    """`heartbeat.exchange` over a Unix socket (exchange itself speaks TCP only)."""
    async with _connected(address, progress) as (reader, writer):
        sent = ping()
        started = time.perf_counter()
        writer.write(sent)
        await writer.drain()
        progress.stage = "waiting for the PONG"
        decoder = FrameDecoder()
        while not (frames := decoder.feed(await _read_some(reader, FRAME_SIZE - decoder.pending))):
            pass
        rtt = time.perf_counter() - started
    reply, ping_frame = frames[0], decode(sent)
    if reply.type is not FrameType.PONG or reply.timestamp_ms != ping_frame.timestamp_ms:
        raise FrameError("type", f"expected the PONG of {ping_frame}, got {reply}")
    return rtt


async def _read_some(reader: asyncio.StreamReader, n: int) -> bytes:
    chunk = await reader.read(n)
    if not chunk:
        raise ConnectionError("peer closed the connection without a PONG")
    return chunk


_CHECKS: dict[str, _Check] = {
    "tcp": _tcp,
    "http": _http,
    "send_expect": _send_expect,
    "heartbeat": _heartbeat,
}
