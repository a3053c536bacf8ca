"""The daemon: assembles listeners, tracker, liveness, health checks and admin, and runs them from
start to the ordered shutdown. Its collaborators each hold one job: signals (signals.py), reload
(reload.py), the ordered shutdown (shutdown.py), what admin asks (admin_backend.py), progress
lines (progress.py), upstream health events (health_events.py); one TaskOwner holds every
background task. A worker process runs the same Daemon with `role=Role.WORKER`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from connwatch._types import HealthState, UpstreamOutcomes
from connwatch.config import ListenerConfig, Settings, load_settings
from connwatch.exceptions import ConfigError
from connwatch.health.monitor import HealthMonitor
from connwatch.health.outlier_detection import OutlierDetector
from connwatch.liveness.watchdog import Watchdog
from connwatch.observe.admin import AdminApp
from connwatch.observe.connection_lines import ConnectionEvents
from connwatch.observe.tracker import Tracker
from connwatch.proxy.listener import Listener
from connwatch.runtime.admin_backend import DaemonBackend, concrete_settings, worker_init
from connwatch.runtime.health_events import HealthEvents, start_heartbeat_responder
from connwatch.runtime.outcome_relay import OutcomeBuffer, relay_outcomes
from connwatch.runtime.progress import ProgressLines
from connwatch.runtime.reload import Reloader
from connwatch.runtime.shutdown import OrderedShutdown
from connwatch.runtime.signals import DaemonSignals
from connwatch.runtime.state import DaemonState, Role
from connwatch.runtime.task_owner import TaskOwner
from connwatch.runtime.upgrade.handover import HandoverServer
from connwatch.runtime.upgrade.messages import UpgradeError
from connwatch.runtime.upgrade.status import UpgradesCollector, UpgradeStatus
from connwatch.runtime.upgrade.takeover import Takeover
from connwatch.runtime.worker_pool import WorkerPool
from connwatch.snapshots import DaemonStats

__all__ = ["Daemon", "Role", "load_for_run", "log_loop_error"]

log = structlog.get_logger("connwatch.server")


class Daemon:
    """One connwatch process. `run()` serves until a signal (or `request_stop()`) ends it.
    A WORKER runs no admin endpoint, health checks, heartbeat responder or workers of its own."""

    def __init__(
        self,
        settings: Settings,
        *,
        config_path: str | os.PathLike[str] | None = None,
        base_config: dict[str, Any] | None = None,
        worker_index: int = 0,
        role: Role = Role.PRIMARY,
        takeover: Takeover | None = None,
    ) -> None:
        # seamless upgrade: the sockets a predecessor handed over, sorted for these settings
        self._takeover = takeover
        self._received = takeover.sort_sockets(settings) if takeover is not None else None
        if self._received is not None:
            worker_index = self._received.id_base  # ids never repeat the old process's
        events = ConnectionEvents(
            enabled=settings.log.connection_events, limit=settings.log.connection_events_limit
        )
        self.tracker = Tracker(worker=worker_index, events=events)
        self.tasks = TaskOwner()
        self.pool = WorkerPool()
        listeners: dict[str, Listener] = {}
        self.health_events = HealthEvents(listeners, self.tracker, self.pool, self.tasks)
        health = HealthMonitor(
            on_protocol_error=self.count_protocol_error,
            on_state_change=self.health_events.target_changed,
        )
        # Passive health: the primary decides; a worker buffers its outcomes for the primary.
        self.detector = OutlierDetector(
            listeners, on_state_change=self.health_events.target_changed
        )
        self.outcome_buffer = OutcomeBuffer() if role is Role.WORKER else None
        outcomes: UpstreamOutcomes = (
            self.detector if self.outcome_buffer is None else self.outcome_buffer
        )
        self.state = DaemonState(
            settings=settings,
            role=role,
            events=events,
            tracker=self.tracker,
            liveness=_make_liveness(),
            health=health,
            pool=self.pool,
            tasks=self.tasks,
            listeners=listeners,
            predecessor=takeover,
            outcomes=outcomes,
        )
        if self._received is not None:
            self.pool.id_base = self._received.id_base
            self.state.inherited.update(self._received.listeners)
        self.progress = ProgressLines(self.state)
        self.reloader = Reloader(
            self.state, self.progress, config_path=config_path, base_config=base_config
        )
        self.backend = DaemonBackend(self.state)
        self.ordered_shutdown = OrderedShutdown(self.state, self._close_everything)
        self.signals = DaemonSignals(
            request_stop=self.request_stop,
            force_stop=self.ordered_shutdown.force,
            reload=self.reloader.reload_in_background,
        )
        self.stopped = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._responder: asyncio.Server | None = None
        token = settings.admin.token
        self.admin = AdminApp(self.backend, token.get_secret_value() if token else None)
        self.upgrade_status = takeover.status if takeover is not None else UpgradeStatus()
        self.handover: HandoverServer | None = None
        if settings.upgrade_socket is not None and role is Role.PRIMARY:
            self.handover = HandoverServer(
                self, settings.upgrade_socket, self.upgrade_status, takeover
            )
        if role is Role.PRIMARY:
            self.registry.register(UpgradesCollector(self._upgrade_totals))
            self.admin.health_details = self._health_details

    # -- what the daemon holds ------------------------------------------------------------------
    @property
    def role(self) -> Role:
        return self.state.role

    @property
    def settings(self) -> Settings:
        return self.state.settings

    @property
    def listeners(self) -> dict[str, Listener]:
        return self.state.listeners

    @property
    def liveness(self) -> Watchdog | None:
        return self.state.liveness

    @property
    def health(self) -> HealthMonitor:
        return self.state.health

    @property
    def started(self) -> bool:
        return self.state.started

    @property
    def draining(self) -> bool:
        return self.state.draining

    @property
    def registry(self) -> CollectorRegistry:
        return self.backend.registry

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind every listener (and, in the primary, the admin endpoint, the heartbeat responder
        and the workers); raises ListenerError / OSError."""
        asyncio.get_running_loop().set_exception_handler(log_loop_error)
        try:
            await self.bind_and_install(self.settings.listeners)
            if self.role is Role.PRIMARY:
                await self._start_primary()
        except BaseException:
            await self._close_everything()
            raise
        self.state.started = True
        self.progress.schedule()
        if self.role is Role.PRIMARY and self._takeover is None:
            self._log_started()

    def _log_started(self) -> None:
        log.info(
            "daemon_started",
            admin=str(self.settings.admin.listen),
            admin_port=self.admin.port,
            pid=os.getpid(),
        )

    async def _start_primary(self) -> None:
        received = self._received
        if received is None or received.admin is None:
            await self.admin.start(self.settings.admin.listen)
        # else: the inherited admin socket is served from the release on (_release_predecessor)
        address = self.settings.admin.heartbeat_listen
        if address is not None:
            responder_sock = received.heartbeat if received is not None else None
            self._responder = await start_heartbeat_responder(
                address, self.count_protocol_error, responder_sock
            )
        if self.handover is not None:
            await self.handover.start(received.upgrade if received is not None else None)
        if self.settings.workers > 1:
            init = worker_init(self.state)
            pass_fds: tuple[int, ...] = ()
            if received is not None:  # every worker accepts on the inherited sockets too
                inherited = {
                    name: [s.fileno() for s in socks] for name, socks in received.listeners.items()
                }
                init.update(id_base=received.id_base, inherited=inherited)
                pass_fds = tuple(fd for fds in inherited.values() for fd in fds)
            await self.pool.spawn(self.settings.workers, init, pass_fds)
            self.tasks.spawn(relay_outcomes(self.pool, self.detector), name="outcome-relay")

    async def run(self) -> None:
        """Start, serve until asked to stop, then drain and stop."""
        self.signals.install()  # before "daemon_started": a SIGHUP right after must not kill us
        try:
            await self.start()
            if self._takeover is not None:
                await self._release_predecessor(self._takeover)
            await self._stop_requested.wait()
            await self.shutdown()
            if self.handover is not None:
                await self.handover.finish()  # a successor takes our final totals
                await self.handover.close()
        finally:
            self.signals.remove()
            self.stopped.set()

    async def _release_predecessor(self, takeover: Takeover) -> None:
        """Accepting on the inherited sockets now: tell the old process to stop accepting. If it
        does not, drain what this process accepted meanwhile and fail (the old one serves on)."""
        received = self._received
        try:
            await takeover.release()
        except UpgradeError:
            for listener in self.listeners.values():
                listener.release()  # the sockets (and a Unix path) stay the old process's
            if self.handover is not None:
                self.handover.disown()
            if received is not None and received.admin is not None:
                received.admin.close()
            await self.shutdown()
            raise
        if self.handover is not None:
            self.handover.own()
        if received is not None and received.admin is not None:
            # Only now: had both processes answered scrapes at once, one without the other's
            # newest connections, a counter could have seemed to go back. Meanwhile scrapes
            # wait in the shared socket's backlog.
            await self.admin.start_on_socket(received.admin)
        self._log_started()

    def heartbeat_sockets(self) -> list[Any]:
        """The heartbeat responder's listening sockets (to hand them to a successor)."""
        return list(self._responder.sockets) if self._responder is not None else []

    def stop_heartbeat_responder(self) -> None:
        """A successor answers heartbeats on the same socket now."""
        if self._responder is not None:
            self._responder.close()
            self._responder = None

    def _upgrade_totals(self) -> dict[str, int]:
        if self.handover is not None:
            return self.handover.upgrade_totals()
        takeover = self._takeover
        return self.upgrade_status.totals(takeover.upgrade_counts() if takeover else None)

    def _health_details(self) -> dict[str, Any]:
        upgrade = self.upgrade_status.describe()
        return {} if upgrade is None else {"upgrade": upgrade}

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def wait_stop_requested(self) -> None:
        await self._stop_requested.wait()

    async def shutdown(self) -> None:
        """Stop accepting, drain up to drain_timeout, close the rest (reason shutdown), stop."""
        await self.ordered_shutdown.run()

    async def _close_everything(self) -> None:
        self.close_data_plane()
        self.detector.close()
        if self.role is Role.PRIMARY:
            await self.health.close()
            if self._responder is not None:
                self._responder.close()
            await self.admin.stop()
            if self.handover is not None and not self.handover.released:
                await self.handover.close()
            if self._takeover is not None:
                await self._takeover.close()
        await self.tasks.cancel_all()

    def close_data_plane(self) -> None:
        """Stop accepting, timers and the watchdog (what every worker process runs)."""
        self.progress.cancel()
        self.state.events.close()
        for listener in self.state.all_listeners():
            listener.stop_accepting()
        if self.liveness is not None:
            self.liveness.close()

    # -- reload and what a worker is told -------------------------------------------------------
    async def reload(self) -> bool:
        """Re-read the config file; apply it to new connections, or keep the old one if invalid."""
        return await self.reloader.reload()

    async def apply_settings(self, new: Settings) -> None:
        """Apply settings already loaded and checked (a worker's `reload` from the primary)."""
        await self.reloader.apply_settings(new)

    async def bind_and_install(self, configs: Iterable[ListenerConfig]) -> None:
        await self.reloader.bind_and_install(configs)

    def set_target_state(
        self,
        listener: str,
        label: str,
        state: HealthState,
        cause: str | None = None,
        ejected_until: float | None = None,
    ) -> None:
        """A target state the primary measured (workers run no health checks)."""
        self.health_events.set_target_state(listener, label, state, cause, ejected_until)

    def drain_outcomes(self) -> list[list[Any]]:
        """A worker's client-connection outcomes since the primary last asked (passive health)."""
        return self.outcome_buffer.drain() if self.outcome_buffer is not None else []

    def count_protocol_error(self, kind: str) -> None:
        self.state.count_protocol_error(kind)

    def concrete_settings(self) -> dict[str, Any]:
        return concrete_settings(self.state)

    # -- what admin and metrics read ------------------------------------------------------------
    def statistics(self) -> DaemonStats:
        return self.backend.statistics()

    async def refresh_metrics(self) -> None:
        await self.backend.refresh_metrics()

    async def connection_records(
        self, listener: str | None, min_idle: float | None, limit: int | None
    ) -> list[dict[str, Any]]:
        return await self.backend.connection_records(listener, min_idle, limit)

    def local_records(
        self, listener: str | None, min_idle: float | None, limit: int | None
    ) -> list[dict[str, Any]]:
        return self.backend.local_records(listener, min_idle, limit)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        return await self.backend.readiness()

    async def close_connection(self, conn_id: str) -> bool:
        return await self.backend.close_connection(conn_id)


def log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Unhandled errors in callbacks and tasks: one structured line instead of stderr noise."""
    exc = context.get("exception")
    log.error(
        "loop_error",
        message=context.get("message"),
        error=repr(exc) if exc is not None else None,
        exc_info=exc if isinstance(exc, BaseException) else None,
    )


def _make_liveness() -> Watchdog | None:
    return Watchdog()


def load_for_run(config_path: str | None, base: dict[str, Any] | None) -> Settings:
    """Settings for `connwatch run`: -c FILE, else $CONNWATCH_CONFIG, else --listen/--upstream."""
    if config_path is None and base is None:
        config_path = os.environ.get("CONNWATCH_CONFIG")
    if config_path is None and base is None:
        raise ConfigError(
            ["no configuration: give -c FILE, set CONNWATCH_CONFIG, or use --listen and --upstream"]
        )
    return load_settings(Path(config_path) if config_path else None, base=base)
