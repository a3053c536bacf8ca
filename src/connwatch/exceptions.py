"""The whole exception hierarchy, and the one place an `OSError` becomes a close reason or text.

Library code raises these; only cli.py turns them into exits. Callers branch on the class or on
`errno`, never on message text.
"""

from __future__ import annotations

import errno
import os

from connwatch._types import CloseReason, Side


class ConnwatchError(Exception):
    """Base of every error connwatch raises on purpose."""


class ConfigError(ConnwatchError):
    """The configuration is invalid. `issues` lists every problem found, one line each."""

    def __init__(self, issues: list[str], source: str | None = None) -> None:
        self.issues = issues
        self.source = source
        head = f"invalid configuration in {source}" if source else "invalid configuration"
        super().__init__(head + ":\n" + "\n".join(f"  - {i}" for i in issues))


class UnitError(ConnwatchError, ValueError):
    """A duration or size that cannot be read: `reason` says why and what is allowed."""

    def __init__(self, given: object, reason: str) -> None:
        self.given = given
        self.reason = reason
        super().__init__(f"{_show(given)}: {reason}")


def _show(value: object) -> str:
    """repr of the offending input, cut short so one bad value cannot flood the message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class ListenerError(ConnwatchError):
    """A listener could not be bound (address in use, permission denied, ...)."""


class WorkerStartError(ConnwatchError):
    """A worker process (`workers` > 1) did not start: it exited or did not answer in time."""


class UpstreamError(ConnwatchError):
    """No upstream target could be reached."""


class NoHealthyUpstreamError(UpstreamError):
    """Every target is DOWN, so no connect was attempted."""


class UpstreamConnectError(UpstreamError):
    """Every connect attempt failed or timed out."""

    def __init__(self, message: str, *, out_of_fds: bool = False) -> None:
        super().__init__(message)
        self.out_of_fds = out_of_fds  # an attempt failed for lack of file descriptors


class ProtocolError(ConnwatchError):
    """A peer sent bytes that break a wire protocol connwatch parses (PROXY header, heartbeat frame)."""


class IncompleteError(ProtocolError):
    """More bytes are needed before a decision can be made (incremental parsers)."""


class FrameError(ProtocolError):
    """Bytes that are not a valid heartbeat frame.

    `check` names the test that failed, so callers never parse the message:
    one of "length", "magic", "version", "type", "checksum", "timestamp".
    """

    def __init__(self, check: str, detail: str) -> None:
        self.check = check
        self.detail = detail
        super().__init__(f"bad heartbeat frame: {check}: {detail}")


class ProxyProtocolError(ProtocolError):
    """A malformed PROXY protocol header: the connection must be closed."""


class AdminApiError(ConnwatchError):
    """A daemon's admin API could not be reached or gave an unusable answer (`connwatch top`)."""


# -- OSError at the socket boundary ---------------------------------------------------------------
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})
NO_FDS_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


def reason_for_error(side: Side, exc: BaseException | None) -> CloseReason | None:
    """What a transport died of, as a close reason (SPEC section 8); None for a clean close."""
    if exc is None:
        return None
    if isinstance(exc, OSError):
        if exc.errno == errno.ETIMEDOUT or isinstance(exc, TimeoutError):
            return CloseReason.KEEPALIVE_TIMEOUT
        if exc.errno in _RESET_ERRNOS or isinstance(exc, ConnectionError):
            return CloseReason.CLIENT_RESET if side is Side.CLIENT else CloseReason.UPSTREAM_RESET
    return CloseReason.ERROR


def reason_for_errno(side: Side, error: int) -> CloseReason:
    """A socket's pending error (SO_ERROR) as a close reason, by the same table."""
    return reason_for_error(side, OSError(error, os.strerror(error))) or CloseReason.ERROR


def describe_error(exc: BaseException) -> str:
    """One short line for an operator: the errno's own text (asyncio's "Connect call failed"
    and sock_connect put the address into strerror; errno alone is the reason), else the
    error's strerror, its words, or its class name."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
