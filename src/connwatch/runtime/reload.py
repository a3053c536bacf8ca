"""Reloader: binds, installs and retires listeners, and applies a new configuration to new
connections (SIGHUP in the primary, the primary's `reload` op in a worker); an invalid file
leaves the running configuration whole."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import Any

import structlog

from connwatch.config import ListenerConfig, Settings, load_settings
from connwatch.exceptions import ConfigError
from connwatch.observe.logs import configure_logging
from connwatch.proxy.listener import Listener
from connwatch.runtime.admin_backend import concrete_settings
from connwatch.runtime.progress import ProgressLines
from connwatch.runtime.state import DaemonState

log = structlog.get_logger("connwatch.server")


class Reloader:
    def __init__(
        self,
        state: DaemonState,
        progress: ProgressLines,
        *,
        config_path: str | os.PathLike[str] | None,
        base_config: dict[str, Any] | None,
    ) -> None:
        self._state = state
        self._progress = progress
        self.config_path = config_path
        self.base_config = base_config
        self._lock = asyncio.Lock()  # a burst of SIGHUPs applies one file at a time

    def reload_in_background(self) -> None:
        """SIGHUP: reload in a task the daemon's TaskOwner holds, unless starting or stopping."""
        state = self._state
        if not state.started or state.draining:
            log.warning("config_reload_skipped", why="daemon is starting or stopping")
            return
        state.tasks.spawn(self.reload(), name="config-reload")

    async def reload(self) -> bool:
        """Re-read the config file; apply it to new connections, or keep the old one if invalid."""
        async with self._lock:
            return await self._reload()

    async def apply_settings(self, new: Settings) -> None:
        """Apply settings already loaded (a worker gets them from the primary)."""
        async with self._lock:
            await self._apply(new)

    async def _reload(self) -> bool:
        state = self._state
        try:
            if self.config_path is None and self.base_config is None:
                raise ConfigError(["no configuration file to reload (started without -c)"])
            new = load_settings(self.config_path, base=self.base_config)
            await self._apply(new)
            if state.pool.workers:
                await state.pool.broadcast("reload", settings=concrete_settings(state))
        except (ConfigError, OSError) as exc:
            state.reloads["failure"] += 1
            issues = exc.issues if isinstance(exc, ConfigError) else [str(exc)]
            log.error("config_reload_failed", errors=issues)
            return False
        state.reloads["success"] += 1
        log.info("config_reloaded", listeners=sorted(state.listeners))
        return True

    async def _apply(self, new: Settings) -> None:
        state = self._state
        old = {cfg.name: cfg for cfg in state.settings.listeners}
        wanted = {cfg.name: cfg for cfg in new.listeners}
        # Bind new addresses first: a bind failure then leaves the running config whole.
        rebinds = [c for n, c in wanted.items() if n not in old or old[n].listen != c.listen]
        started = await self._bind_all(rebinds)
        for name in old.keys() - wanted.keys():
            self._retire(name)
        for listener in started:
            if listener.name in state.listeners:
                self._retire(listener.name)
            self._install(listener)
        for name, cfg in wanted.items():
            if name in old and old[name].listen == cfg.listen and old[name] != cfg:
                listener = state.listeners[name]
                listener.reconfigure(cfg)
                self._install(listener)
        configure_logging(new.log.level, new.log.format)
        state.events.configure(
            enabled=new.log.connection_events, limit=new.log.connection_events_limit
        )
        progress_changed = new.log.progress_interval != state.settings.log.progress_interval
        state.settings = new
        if progress_changed:
            self._progress.schedule()

    async def bind_and_install(self, configs: Iterable[ListenerConfig]) -> None:
        """Bind every listener of `configs` (all or none) and put them in service."""
        for listener in await self._bind_all(list(configs)):
            self._install(listener)

    async def _bind_all(self, configs: list[ListenerConfig]) -> list[Listener]:
        state = self._state
        started: list[Listener] = []
        try:
            for cfg in configs:
                listener = Listener(
                    cfg,
                    state.tracker,
                    liveness=state.liveness,
                    reuse_port=state.settings.workers > 1,
                    outcomes=state.outcomes,
                )
                inherited = state.inherited.pop(cfg.name, None)  # seamless upgrade
                await (listener.start_inherited(inherited) if inherited else listener.start())
                started.append(listener)
        except BaseException:
            for listener in started:
                listener.stop_accepting()
            raise
        return started

    def _install(self, listener: Listener) -> None:
        state = self._state
        state.listeners[listener.name] = listener
        if state.liveness is not None:
            state.liveness.configure(listener.name, listener.config)
        if state.checks_enabled:
            state.health.start(listener.name, listener.config.health_check, listener.pool.targets)

    def _retire(self, name: str) -> None:
        state = self._state
        listener = state.listeners.pop(name)
        listener.stop_accepting()
        state.health.stop(name)
        state.retired.append(listener)
