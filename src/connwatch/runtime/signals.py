"""Signal handlers on the loop. The primary: SIGTERM or SIGINT starts the drain, a second one
forces the exit, SIGHUP reloads. A worker: SIGTERM/SIGINT stop it, SIGHUP is ignored (its
reloads come from the primary)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

import structlog

log = structlog.get_logger("connwatch.server")

_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class DaemonSignals:
    """The primary's handlers; they only set events and start tasks (nothing here awaits)."""

    def __init__(
        self,
        *,
        request_stop: Callable[[], None],
        force_stop: Callable[[], None],
        reload: Callable[[], None],
    ) -> None:
        self._request_stop = request_stop
        self._force_stop = force_stop
        self._reload = reload
        self._stops = 0

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, self._on_stop, "SIGTERM")
            loop.add_signal_handler(signal.SIGINT, self._on_stop, "SIGINT")
            loop.add_signal_handler(signal.SIGHUP, self._reload)

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in _HANDLED:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)

    def _on_stop(self, name: str) -> None:
        self._stops += 1
        if self._stops == 1:
            log.info("shutdown_requested", signal=name)
            self._request_stop()
        else:  # a second signal: stop draining and close everything now
            log.warning("shutdown_forced", signal=name)
            self._force_stop()


def install_worker_signals(request_stop: Callable[[], None]) -> None:
    """A worker drains on SIGTERM/SIGINT (each time: the primary sends one) and ignores SIGHUP."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, request_stop)
        loop.add_signal_handler(signal.SIGINT, request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
