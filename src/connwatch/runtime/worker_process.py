"""A worker process of `workers: N`: the listeners and data plane of one process, driven by the
primary over its control socket (see workers.py). No admin endpoint, no health checks of its own."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import structlog

from connwatch._types import HealthState
from connwatch.config import load_settings
from connwatch.observe.logs import configure_logging
from connwatch.runtime.daemon import Daemon, log_loop_error
from connwatch.runtime.worker_pool import ControlChannel, inherited_channel_socket, serve_control
from connwatch.snapshots import stats_to_wire

log = structlog.get_logger("connwatch.worker")


class WorkerDaemon(Daemon):
    """The daemon minus admin and health checks; the primary relays target health to it."""

    def __init__(self, settings: Any, index: int, channel: ControlChannel) -> None:
        super().__init__(settings, worker_index=index)
        self.index = index
        self.channel = channel
        self.checks_enabled = False

    async def start(self) -> None:
        asyncio.get_running_loop().set_exception_handler(log_loop_error)
        for listener in await self._bind_all(list(self.settings.listeners)):
            self._install(listener)
        self.started = True
        self._schedule_progress()
        log.info("worker_started", worker=self.index)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, lambda: None)  # reloads come from the primary
        control = loop.create_task(serve_control(self.channel, self._handlers()))
        stop = loop.create_task(self._stop_requested.wait())
        try:
            await asyncio.wait({control, stop}, return_when=asyncio.FIRST_COMPLETED)
            await self.shutdown()  # the primary said stop, or went away
        finally:
            stop.cancel()
            control.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control
            self.channel.close()

    async def _close_everything(self) -> None:
        self.close_data_plane()  # no admin, health checks or responder in a worker

    def _handlers(self) -> dict[str, Any]:
        return {
            "init": self._op_init,
            "stats": self._op_stats,
            "connections": self._op_connections,
            "close": self._op_close,
            "health": self._op_health,
            "reload": self._op_reload,
            "stop": self._op_stop,
        }

    async def _op_init(self, args: dict[str, Any]) -> bool:
        return True  # settings and states were applied before serving (see run_worker)

    async def _op_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        return stats_to_wire(self.statistics())

    async def _op_connections(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return self.local_records(args.get("listener"), args.get("min_idle"), args.get("limit"))

    async def _op_close(self, args: dict[str, Any]) -> bool:
        return await self.close_connection(str(args["id"]))

    async def _op_health(self, args: dict[str, Any]) -> bool:
        self.set_target_state(args["listener"], args["target"], HealthState(args["state"]))
        return True

    async def _op_reload(self, args: dict[str, Any]) -> bool:
        new = load_settings(None, base=args["settings"], env={})
        async with self._reload_lock:
            await self._apply(new)
        return True

    async def _op_stop(self, args: dict[str, Any]) -> bool:
        self.request_stop()
        return True

    def set_target_state(self, listener: str, label: str, state: HealthState) -> None:
        owner = self.listeners.get(listener)
        target = owner.pool.by_label(label) if owner is not None else None
        if target is not None:
            target.state = state
            self._target_changed(listener, target, state, state)


async def run_worker(index: int, fd: int) -> None:
    """Entry of `connwatch _worker`: take the primary's settings, bind, serve until told to stop."""
    channel = await ControlChannel.open(inherited_channel_socket(fd))
    first = await channel.receive()
    if first is None or first.get("op") != "init":
        raise RuntimeError("worker expected an init message from the primary")
    settings = load_settings(None, base=first["settings"], env={})
    configure_logging(settings.log.level, settings.log.format)
    daemon = WorkerDaemon(settings, index, channel)
    await daemon.start()
    for listener, states in first.get("states", {}).items():
        for label, state in states.items():
            daemon.set_target_state(listener, label, HealthState(state))
    await channel.send({"ok": True, "result": True})
    await daemon.run()
