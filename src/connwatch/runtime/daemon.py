"""The daemon: assembles listeners, tracker, liveness, health checks and admin; signals; reload;
one ordered, deadline-bound shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from connwatch._types import (
    Address,
    CloseReason,
    ConnectionState,
    HealthState,
    Liveness,
    Throttle,
    rfc3339,
)
from connwatch.config import ListenerConfig, Settings, load_settings
from connwatch.exceptions import ConfigError, ListenerError
from connwatch.health.monitor import HealthMonitor
from connwatch.heartbeat import start_responder
from connwatch.liveness.watchdog import Watchdog
from connwatch.observe.admin import AdminApp
from connwatch.observe.connection_lines import ConnectionEvents
from connwatch.observe.logs import configure_logging
from connwatch.observe.metrics import build_registry
from connwatch.observe.tracker import Tracker, connection_record
from connwatch.proxy.connection import MonitoredConnection
from connwatch.proxy.listener import Listener
from connwatch.proxy.upstream import Target
from connwatch.runtime.worker_pool import WorkerPool
from connwatch.snapshots import DaemonStats, TargetStats
from connwatch.wire.heartbeat_frame import FrameError

HEARTBEAT_FRAME = "heartbeat_frame"  # the `kind` of connwatch_protocol_errors_total

log = structlog.get_logger("connwatch.server")

_FINAL_CLOSE_WAIT = 5.0  # seconds to let closed connections finish after the drain deadline


class Daemon:
    """One connwatch process. `run()` serves until a signal (or `request_stop()`) ends it."""

    def __init__(
        self,
        settings: Settings,
        *,
        config_path: str | os.PathLike[str] | None = None,
        base_config: dict[str, Any] | None = None,
        worker_index: int = 0,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.base_config = base_config
        self.events = ConnectionEvents(
            enabled=settings.log.connection_events, limit=settings.log.connection_events_limit
        )
        self.tracker = Tracker(worker=worker_index, events=self.events)
        self.checks_enabled = True  # the primary checks upstreams; workers are told the results
        self.pool = WorkerPool()
        self._merged: DaemonStats | None = None  # all workers, taken just before a scrape
        self._tasks: set[asyncio.Task[Any]] = set()
        self.listeners: dict[str, Listener] = {}
        self.retired: list[Listener] = []  # removed by a reload; their connections still run
        self.liveness: Watchdog | None = _make_liveness()
        self.health = HealthMonitor(
            on_protocol_error=self.count_protocol_error, on_state_change=self._target_changed
        )
        self._responder: asyncio.Server | None = None
        self.protocol_errors: Counter[str] = Counter()
        self.reloads: Counter[str] = Counter()
        self.draining = False
        self.stopped = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._signals = 0
        self.started = False
        self._reloads: set[asyncio.Task[bool]] = set()
        self._reload_lock = asyncio.Lock()
        self._force = asyncio.Event()  # a second stop signal: skip the drain
        self._progress: asyncio.TimerHandle | None = None
        self.registry: CollectorRegistry = build_registry(lambda: self._merged or self.statistics())
        token = settings.admin.token
        self.admin = AdminApp(self, token.get_secret_value() if token else None)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind every listener and the admin endpoint; raises ListenerError / OSError."""
        asyncio.get_running_loop().set_exception_handler(log_loop_error)
        try:
            for listener in await self._bind_all(list(self.settings.listeners)):
                self._install(listener)
            await self.admin.start(self.settings.admin.listen)
            await self._start_responder()
            if self.settings.workers > 1:
                await self.pool.spawn(self.settings.workers, self._worker_init())
        except BaseException:
            await self._close_everything()
            raise
        self.started = True
        self._schedule_progress()
        log.info(
            "daemon_started",
            admin=str(self.settings.admin.listen),
            admin_port=self.admin.port,
            pid=os.getpid(),
        )

    async def run(self) -> None:
        """Start, serve until asked to stop, then drain and stop."""
        self._install_signals()  # before "daemon_started": a SIGHUP right after must not kill us
        try:
            await self.start()
            await self._stop_requested.wait()
            await self.shutdown()
        finally:
            self._remove_signals()
            self.stopped.set()

    def request_stop(self) -> None:
        self._stop_requested.set()

    # -- signals --------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, "SIGTERM")
            loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, "SIGINT")
            loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)

    def _on_stop_signal(self, name: str) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("shutdown_requested", signal=name)
            self.request_stop()
        else:  # a second signal: stop draining and close everything now
            log.warning("shutdown_forced", signal=name)
            self._close_all(CloseReason.SHUTDOWN, abort=True)
            self._force.set()

    def _on_reload_signal(self) -> None:
        if not self.started or self.draining:
            log.warning("config_reload_skipped", why="daemon is starting or stopping")
            return
        task = asyncio.get_running_loop().create_task(self.reload())
        self._reloads.add(task)  # held until done: a reload must not be garbage-collected
        task.add_done_callback(self._reloads.discard)

    # -- reload ---------------------------------------------------------------------------------
    async def reload(self) -> bool:
        """Re-read the config file; apply it to new connections, or keep the old one if invalid."""
        async with self._reload_lock:  # a burst of SIGHUPs applies one file at a time
            return await self._reload()

    async def _reload(self) -> bool:
        try:
            if self.config_path is None and self.base_config is None:
                raise ConfigError(["no configuration file to reload (started without -c)"])
            new = load_settings(self.config_path, base=self.base_config)
            await self._apply(new)
            if self.pool.workers:
                await self.pool.broadcast("reload", settings=self.concrete_settings())
        except (ConfigError, OSError) as exc:
            self.reloads["failure"] += 1
            issues = exc.issues if isinstance(exc, ConfigError) else [str(exc)]
            log.error("config_reload_failed", errors=issues)
            return False
        self.reloads["success"] += 1
        log.info("config_reloaded", listeners=sorted(self.listeners))
        return True

    async def _apply(self, new: Settings) -> None:
        old = {cfg.name: cfg for cfg in self.settings.listeners}
        wanted = {cfg.name: cfg for cfg in new.listeners}
        # Bind new addresses first: a bind failure then leaves the running config whole.
        rebinds = [c for n, c in wanted.items() if n not in old or old[n].listen != c.listen]
        started = await self._bind_all(rebinds)
        for name in old.keys() - wanted.keys():
            self._retire(name)
        for listener in started:
            if listener.name in self.listeners:
                self._retire(listener.name)
            self._install(listener)
        for name, cfg in wanted.items():
            if name in old and old[name].listen == cfg.listen and old[name] != cfg:
                listener = self.listeners[name]
                listener.reconfigure(cfg)
                self._install(listener)
        configure_logging(new.log.level, new.log.format)
        self.events.configure(
            enabled=new.log.connection_events, limit=new.log.connection_events_limit
        )
        progress_changed = new.log.progress_interval != self.settings.log.progress_interval
        self.settings = new
        if progress_changed:
            self._schedule_progress()

    async def _bind_all(self, configs: list[ListenerConfig]) -> list[Listener]:
        started: list[Listener] = []
        try:
            for cfg in configs:
                listener = Listener(
                    cfg, self.tracker, liveness=self.liveness, reuse_port=self.settings.workers > 1
                )
                await listener.start()
                started.append(listener)
        except BaseException:
            for listener in started:
                listener.stop_accepting()
            raise
        return started

    def _install(self, listener: Listener) -> None:
        self.listeners[listener.name] = listener
        if self.liveness is not None:
            self.liveness.configure(listener.name, listener.config)
        if self.checks_enabled:
            self.health.start(listener.name, listener.config.health_check, listener.pool.targets)

    def _retire(self, name: str) -> None:
        listener = self.listeners.pop(name)
        listener.stop_accepting()
        self.health.stop(name)
        self.retired.append(listener)

    # -- shutdown -------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Stop accepting, drain up to drain_timeout, close the rest (reason shutdown), stop."""
        cfg = self.settings.shutdown
        self.draining = True
        log.info(
            "shutdown_started",
            open_connections=len(self.tracker),
            drain_timeout_s=cfg.drain_timeout,
        )
        for listener in self.listeners.values():
            listener.stop_accepting()
        workers = self._spawn(self.pool.stop(cfg.drain_timeout + _FINAL_CLOSE_WAIT + 5))
        deadline = time.monotonic() + cfg.drain_timeout
        quiet = (
            asyncio.get_running_loop().create_task(self._quiet_closer())
            if cfg.quiet_close
            else None
        )
        drained = await self._wait_empty(deadline)
        if quiet is not None:
            quiet.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await quiet
        if not drained:
            await self._close_remaining()
        await workers
        await self._close_everything()
        log.info("shutdown_complete", remaining_connections=len(self.tracker))

    async def _wait_empty(self, deadline: float) -> bool:
        waiter = asyncio.ensure_future(self.tracker.wait_empty())
        force = asyncio.ensure_future(self._force.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, force},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            waiter.cancel()
            force.cancel()
        return waiter in done

    async def _quiet_closer(self) -> None:
        """While draining, close each connection at its first quiet gap."""
        period = self.settings.shutdown.quiet_period
        while True:
            now = time.monotonic()
            for conn in self.tracker.connections():
                if conn.state in (ConnectionState.OPEN, ConnectionState.HALF_CLOSED) and conn.is_quiet(period, now):
                    conn.close(CloseReason.SHUTDOWN)
            await asyncio.sleep(max(period / 4, 0.02))

    async def _close_remaining(self) -> None:
        rate = self.settings.shutdown.close_rate
        if rate <= 0:
            self._close_all(CloseReason.SHUTDOWN)
        else:
            for conn in list(self.tracker.connections()):
                conn.close(CloseReason.SHUTDOWN)
                await asyncio.sleep(1.0 / rate)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_FINAL_CLOSE_WAIT):
                await self.tracker.wait_empty()
        self._close_all(CloseReason.SHUTDOWN, abort=True)

    def _close_all(self, reason: CloseReason, *, abort: bool = False) -> None:
        for conn in list(self.tracker.connections()):
            conn.close(reason, abort=abort)

    async def _close_everything(self) -> None:
        self.close_data_plane()
        await self.health.close()
        if self._responder is not None:
            self._responder.close()
        await self.admin.stop()

    def close_data_plane(self) -> None:
        """Stop accepting, timers and the watchdog (what every worker process runs)."""
        if self._progress is not None:
            self._progress.cancel()
        self.events.close()
        for listener in [*self.listeners.values(), *self.retired]:
            listener.stop_accepting()
        if self.liveness is not None:
            self.liveness.close()

    # -- what admin and metrics read ------------------------------------------------------------
    def statistics(self) -> DaemonStats:
        targets: dict[tuple[str, str], TargetStats] = {}
        for listener in self.listeners.values():
            for target in listener.pool.targets:
                targets[(listener.name, target.label)] = target.statistics(listener.name)
        return DaemonStats(
            listeners=self.tracker.statistics(),
            targets=targets,
            liveness=self.liveness.statistics() if self.liveness is not None else {},
            protocol_errors=self._protocol_errors(),
            reloads=dict(self.reloads),
        )

    async def refresh_metrics(self) -> None:
        """Before a scrape: merge every worker's snapshot (one process reads live state)."""
        if not self.pool.workers:
            self._merged = None
            return
        self._merged = DaemonStats.merge_all([self.statistics(), *await self.pool.statistics()])

    async def connection_records(
        self, listener: str | None, min_idle: float | None, limit: int | None
    ) -> list[dict[str, Any]]:
        records = self.local_records(listener, min_idle, limit)
        if self.pool.workers and (limit is None or len(records) < limit):
            more = await self.pool.connection_records(
                listener=listener, min_idle=min_idle, limit=limit
            )
            records.extend(more[: None if limit is None else limit - len(records)])
        return records

    def local_records(
        self, listener: str | None, min_idle: float | None, limit: int | None
    ) -> list[dict[str, Any]]:
        now = time.monotonic()
        out: list[dict[str, Any]] = []
        for conn in self.tracker.connections(listener):
            if limit is not None and len(out) >= limit:
                break
            if conn.state is ConnectionState.CONNECTING:
                continue
            if min_idle is not None and conn.idle(now) < min_idle:
                continue
            record = connection_record(conn, now)
            record.update(self._describe(conn, now))
            out.append(record)
        return out

    def _describe(self, conn: MonitoredConnection, now: float) -> dict[str, Any]:
        if self.liveness is not None:
            return self.liveness.describe(conn)
        liveness = Liveness.HALF_CLOSED if conn.half_closed else Liveness.OK
        return {
            "liveness": str(liveness),
            "heartbeat": {"state": "ok", "failures": 0, "interval_s": None},
            "tcp": None,
        }

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        listeners: dict[str, Any] = {}
        ready = not self.draining
        for name, listener in self.listeners.items():
            checks_on = listener.config.health_check.enabled
            upstreams = {
                t.label: {
                    "status": str(t.state),
                    "last_check": rfc3339(t.last_check) if t.last_check is not None else None,
                    "latency_ms": t.latency_ms,
                    "consecutive_failures": t.consecutive_failures,
                }
                for t in listener.pool.targets
            }
            up = (
                listener.bound
                and listener.accepting
                and (not checks_on or any(t.state is HealthState.UP for t in listener.pool.targets))
            )
            ready = ready and up
            listeners[name] = {"status": "UP" if up else "DOWN", "upstreams": upstreams}
        return ready, {"status": "UP" if ready else "DOWN", "listeners": listeners}

    async def close_connection(self, conn_id: str) -> bool:
        conn = self.tracker.get(conn_id)
        if conn is None:
            return await self.pool.close_connection(conn_id) if self.pool.workers else False
        conn.close(CloseReason.ADMIN_CLOSED)
        return True

    # -- workers --------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # held until done
        task.add_done_callback(self._tasks.discard)
        return task

    def concrete_settings(self) -> dict[str, Any]:
        """The settings as JSON-safe data with port-0 listeners pinned to the ports we got,
        so that every worker binds the same ones."""
        data: dict[str, Any] = self.settings.model_dump(mode="json")
        data["admin"]["token"] = None  # workers serve no admin endpoint
        for raw in data["listeners"]:
            listener = self.listeners.get(raw["name"])
            address = listener.config.listen if listener is not None else None
            if listener is not None and address is not None and address.path is None:
                raw["listen"] = str(Address(address.host, listener.port))
        return data

    def _worker_init(self) -> dict[str, Any]:
        states = {
            name: {t.label: str(t.state) for t in listener.pool.targets}
            for name, listener in self.listeners.items()
        }
        return {"settings": self.concrete_settings(), "states": states}

    # -- connection_progress lines -------------------------------------------------------------
    def _schedule_progress(self) -> None:
        if self._progress is not None:
            self._progress.cancel()
            self._progress = None
        interval = self.settings.log.progress_interval
        if interval > 0:
            self._progress = asyncio.get_running_loop().call_later(interval, self._progress_tick)

    def _progress_tick(self) -> None:
        self._progress = None
        if self.draining:
            return
        self.events.progress(self.tracker.connections(), self.settings.log.progress_interval)
        self._schedule_progress()

    def count_protocol_error(self, kind: str) -> None:
        self.protocol_errors[kind] += 1

    def _protocol_errors(self) -> dict[str, int]:
        total = Counter(self.protocol_errors)
        for listener in [*self.listeners.values(), *self.retired]:
            total.update(listener.protocol_errors)
        return dict(total)

    # -- upstream health and the heartbeat responder --------------------------------------------
    def _target_changed(
        self, listener: str, target: Target, old: HealthState, new: HealthState
    ) -> None:
        if self.pool.workers:
            self._spawn(
                self.pool.broadcast("health", listener=listener, target=target.label, state=new)
            )
        owner = self.listeners.get(listener)
        if new is not HealthState.DOWN or owner is None:
            return
        if owner.config.on_upstream_down != "close":
            return
        for conn in self.tracker.connections(listener):
            if conn.target is target:
                conn.close(CloseReason.UPSTREAM_DOWN)

    async def _start_responder(self) -> None:
        address = self.settings.admin.heartbeat_listen
        if address is None:
            return
        if address.path is not None:
            raise ListenerError("admin.heartbeat_listen must be a TCP address")

        throttle = Throttle()

        def bad_frame(error: FrameError, peer: str) -> None:
            self.count_protocol_error(HEARTBEAT_FRAME)
            if (suppressed := throttle.allow(HEARTBEAT_FRAME)) is not None:
                log.warning(
                    "protocol_error",
                    kind=HEARTBEAT_FRAME,
                    client=peer,
                    error=str(error),
                    suppressed=suppressed,
                )

        try:
            self._responder = await start_responder(
                address.host or "0.0.0.0", address.port, on_protocol_error=bad_frame
            )
        except OSError as exc:
            raise ListenerError(f"admin.heartbeat_listen {address}: {exc.strerror or exc}") from exc
        port = self._responder.sockets[0].getsockname()[1]
        log.info("heartbeat_responder_started", listen=str(address), port=port)


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
