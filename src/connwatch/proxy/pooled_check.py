"""The checks of a pooled upstream socket (SPEC section 9): kernel state, a peek, a probe.

Each returns an eviction reason, or None when the socket may be lent. `check_socket` is two
system calls and never blocks: it runs before a client gets the socket and at every scan.
`probe` awaits (it is a scan's, never a client's): it sends the probe, reads the reply within the
timeout and consumes it, so what a client later reads starts after it.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import socket
import termios
from typing import Final

from connwatch.config import SendExpectConfig

__all__ = [
    "EVICTION_REASONS",
    "MAX_IDLE_AGE",
    "NOT_ESTABLISHED",
    "PEER_CLOSED",
    "PEER_RESET",
    "PROBE_FAILED",
    "SHUTDOWN",
    "TARGET_DOWN",
    "UNEXPECTED_DATA",
    "check_socket",
    "pending_bytes",
    "probe",
]

PEER_CLOSED: Final = "peer_closed"
PEER_RESET: Final = "peer_reset"
NOT_ESTABLISHED: Final = "not_established"
PROBE_FAILED: Final = "probe_failed"
UNEXPECTED_DATA: Final = "unexpected_data"
MAX_IDLE_AGE: Final = "max_idle_age"
TARGET_DOWN: Final = "target_down"
SHUTDOWN: Final = "shutdown"
EVICTION_REASONS: Final = (
    PEER_CLOSED,
    PEER_RESET,
    NOT_ESTABLISHED,
    PROBE_FAILED,
    UNEXPECTED_DATA,
    MAX_IDLE_AGE,
    TARGET_DOWN,
    SHUTDOWN,
)

_TCP_ESTABLISHED: Final = 1  # tcpi_state, the first byte of struct tcp_info (linux/tcp.h)
_TCP_CLOSE_WAIT: Final = 8  # the peer sent FIN
_PEEK: Final = socket.MSG_PEEK | socket.MSG_DONTWAIT
_PEEK_BUF = bytearray(1)  # one byte tells data from end-of-stream; the loop is single-threaded
_MAX_REPLY: Final = 64 * 1024  # a probe reply longer than this is not a health answer


def check_socket(sock: socket.socket) -> str | None:
    """Why `sock` must not be lent (peer_reset, peer_closed, not_established), or None.

    The peek comes first: it tells a reset (the error it returns) from a close (end of stream);
    TCP_INFO then catches a FIN behind data still unread (CLOSE_WAIT) and any other state."""
    try:
        if sock.recv_into(_PEEK_BUF, 1, _PEEK) == 0:
            return PEER_CLOSED
    except (BlockingIOError, InterruptedError):
        pass  # nothing to read: the usual case
    except ConnectionResetError:
        return PEER_RESET
    except OSError:
        return NOT_ESTABLISHED
    state = _tcp_state(sock)
    if state is None or state == _TCP_ESTABLISHED:
        return None
    return PEER_CLOSED if state == _TCP_CLOSE_WAIT else NOT_ESTABLISHED


def pending_bytes(sock: socket.socket) -> int:
    """Bytes the upstream sent that are waiting unread in the kernel (FIONREAD)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf, True)
    except OSError:
        return 0
    return buf[0]


async def probe(sock: socket.socket, check: SendExpectConfig, timeout: float) -> str | None:
    """Send `check.send`, read until the reply matches `check.expect` (prefix or `re:`) within
    `timeout`, and consume it: None when it matched, else probe_failed (or the check's verdict
    when the peer went away). Bytes already waiting before the probe are unexpected_data: the
    reply could not be told from them."""
    if pending_bytes(sock):
        return UNEXPECTED_DATA
    loop = asyncio.get_running_loop()
    reply = b""
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, check.send_bytes)
            while not check.matches(reply):
                if len(reply) >= _MAX_REPLY or not _could_match(check, reply):
                    return PROBE_FAILED
                chunk = await loop.sock_recv(sock, _MAX_REPLY - len(reply))
                if not chunk:
                    return PEER_CLOSED
                reply += chunk
    except TimeoutError:
        return PROBE_FAILED
    except ConnectionResetError:
        return PEER_RESET
    except OSError:
        return NOT_ESTABLISHED
    # The rest of a reply that matched by its prefix, when it came in the same segment.
    with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
        while sock.recv(_MAX_REPLY, socket.MSG_DONTWAIT):
            pass
    return None


def _could_match(check: SendExpectConfig, reply: bytes) -> bool:
    """False once a prefix expectation can no longer be met (no need to wait for the timeout)."""
    expect = check.expect_bytes
    if expect is None:
        return True
    common = min(len(expect), len(reply))
    return reply[:common] == expect[:common]


def _tcp_state(sock: socket.socket) -> int | None:
    """tcpi_state of a TCP socket; None where TCP_INFO does not exist (a Unix socket)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return None
