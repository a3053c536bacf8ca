"""The whole exception hierarchy. Library code raises these; only cli.py turns them into exits."""

from __future__ import annotations


class ConnwatchError(Exception):
    """Base of every error connwatch raises on purpose."""


class ConfigError(ConnwatchError):
    """The configuration is invalid. `issues` lists every problem found, one line each."""

    def __init__(self, issues: list[str], source: str | None = None) -> None:
        self.issues = issues
        self.source = source
        head = f"invalid configuration in {source}" if source else "invalid configuration"
        super().__init__(head + ":\n" + "\n".join(f"  - {i}" for i in issues))


class ListenerError(ConnwatchError):
    """A listener could not be bound (address in use, permission denied, ...)."""


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


class AdminApiError(ConnwatchError):
    """A daemon's admin API could not be reached or gave an unusable answer (`connwatch top`)."""
