"""Upstream health seen by the daemon: a target's state change is relayed to the workers and, with
`on_upstream_down: close`, closes the target's connections; and the heartbeat responder."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import structlog

from connwatch._types import Address, CloseReason, HealthState, Throttle
from connwatch.exceptions import ListenerError
from connwatch.health.heartbeat_io import start_responder
from connwatch.observe.tracker import Tracker
from connwatch.proxy.listener import Listener
from connwatch.proxy.upstream import Target
from connwatch.runtime.task_owner import TaskOwner
from connwatch.runtime.worker_pool import WorkerPool
from connwatch.wire.heartbeat_frame import FrameError

HEARTBEAT_FRAME = "heartbeat_frame"  # the `kind` of connwatch_protocol_errors_total

log = structlog.get_logger("connwatch.server")


class HealthEvents:
    """Reacts to target state changes, from the primary's checks or relayed by the primary."""

    def __init__(
        self, listeners: dict[str, Listener], tracker: Tracker, pool: WorkerPool, tasks: TaskOwner
    ) -> None:
        self._listeners = listeners  # the daemon's dict: a reload changes it in place
        self._tracker = tracker
        self._pool = pool
        self._tasks = tasks

    def target_changed(
        self, listener: str, target: Target, old: HealthState, new: HealthState
    ) -> None:
        """The HealthMonitor's `on_state_change` hook."""
        if self._pool.workers:
            self._tasks.spawn(
                self._pool.broadcast(
                    "health",
                    listener=listener,
                    target=target.label,
                    state=new,
                    cause=target.cause,
                    ejected_until=target.ejected_until,
                )
            )
        owner = self._listeners.get(listener)
        if owner is not None:
            owner.target_state_changed(target)  # the warm pool empties or refills
        if new is not HealthState.DOWN or owner is None:
            return
        if owner.config.on_upstream_down != "close":
            return
        for conn in self._tracker.connections(listener):
            if conn.target is target:
                conn.close(CloseReason.UPSTREAM_DOWN)

    def set_target_state(
        self,
        listener: str,
        label: str,
        state: HealthState,
        cause: str | None = None,
        ejected_until: float | None = None,
    ) -> None:
        """A state the primary measured or decided (a worker runs no checks of its own)."""
        owner = self._listeners.get(listener)
        target = owner.pool.by_label(label) if owner is not None else None
        if target is not None:
            target.state = state
            if cause is not None:
                target.cause = cause
            target.ejected_until = ejected_until
            self.target_changed(listener, target, state, state)


async def start_heartbeat_responder(
    address: Address,
    count_protocol_error: Callable[[str], None],
    sock: socket.socket | None = None,
) -> asyncio.Server:
    """Answer heartbeat pings on `admin.heartbeat_listen`; raises ListenerError."""
    if address.path is not None:
        raise ListenerError("admin.heartbeat_listen must be a TCP address")

    throttle = Throttle()

    def bad_frame(error: FrameError, peer: str) -> None:
        count_protocol_error(HEARTBEAT_FRAME)
        if (suppressed := throttle.allow(HEARTBEAT_FRAME)) is not None:
            log.warning(
                "protocol_error",
                kind=HEARTBEAT_FRAME,
                client=peer,
                error=str(error),
                suppressed=suppressed,
            )

    try:
        responder = await start_responder(
            address.host or "0.0.0.0", address.port, on_protocol_error=bad_frame, sock=sock
        )
    except OSError as exc:
        raise ListenerError(f"admin.heartbeat_listen {address}: {exc.strerror or exc}") from exc
    port = responder.sockets[0].getsockname()[1]
    log.info("heartbeat_responder_started", listen=str(address), port=port)
    return responder
