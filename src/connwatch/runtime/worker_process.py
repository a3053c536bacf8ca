"""A worker process of `workers: N`: the listeners and data plane of one process, driven by the
primary over its control socket (see worker_pool.py and control_channel.py). It runs a Daemon with
`role=Role.WORKER`: no admin endpoint, no health checks of its own."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from connwatch._types import HealthState
from connwatch.config import Settings, load_settings
from connwatch.observe.logs import configure_logging
from connwatch.runtime.control_channel import (
    ControlChannel,
    Handler,
    inherited_channel_socket,
    serve_control,
)
from connwatch.runtime.daemon import Daemon
from connwatch.runtime.signals import install_worker_signals
from connwatch.runtime.state import Role
from connwatch.snapshots import stats_to_wire

log = structlog.get_logger("connwatch.worker")


class WorkerProcess:
    """One worker: a WORKER-role Daemon and the control channel it answers the primary on; the
    primary relays target health to it."""

    def __init__(self, settings: Settings, index: int, channel: ControlChannel) -> None:
        self.index = index
        self.channel = channel
        self.daemon = Daemon(settings, worker_index=index, role=Role.WORKER)

    async def start(self) -> None:
        await self.daemon.start()
        log.info("worker_started", worker=self.index)

    async def run(self) -> None:
        """Serve the primary until it says stop or goes away (or SIGTERM), then drain and stop."""
        daemon = self.daemon
        install_worker_signals(daemon.request_stop)
        control = daemon.tasks.spawn(serve_control(self.channel, self._handlers()))
        stop = daemon.tasks.spawn(daemon.wait_stop_requested())
        try:
            await asyncio.wait({control, stop}, return_when=asyncio.FIRST_COMPLETED)
            await daemon.shutdown()  # the primary said stop, or went away
        finally:
            try:
                await daemon.tasks.cancel(stop, control)
            finally:
                self.channel.close()

    def _handlers(self) -> dict[str, Handler]:
        return {
            "init": self._op_init,
            "stats": self._op_stats,
            "connections": self._op_connections,
            "close": self._op_close,
            "health": self._op_health,
            "outcomes": self._op_outcomes,
            "reload": self._op_reload,
            "stop": self._op_stop,
        }

    async def _op_init(self, args: dict[str, Any]) -> bool:
        return True  # settings and states were applied before serving (see run_worker)

    async def _op_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        return stats_to_wire(self.daemon.statistics())

    async def _op_connections(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return self.daemon.local_records(
            args.get("listener"), args.get("min_idle"), args.get("limit")
        )

    async def _op_close(self, args: dict[str, Any]) -> bool:
        return await self.daemon.close_connection(str(args["id"]))

    async def _op_health(self, args: dict[str, Any]) -> bool:
        self.daemon.set_target_state(
            args["listener"],
            args["target"],
            HealthState(args["state"]),
            cause=args.get("cause"),
            ejected_until=args.get("ejected_until"),
        )
        return True

    async def _op_outcomes(self, args: dict[str, Any]) -> list[list[Any]]:
        return self.daemon.drain_outcomes()

    async def _op_reload(self, args: dict[str, Any]) -> bool:
        await self.daemon.apply_settings(load_settings(None, base=args["settings"], env={}))
        return True

    async def _op_stop(self, args: dict[str, Any]) -> bool:
        self.daemon.request_stop()
        return True


async def run_worker(index: int, fd: int) -> None:
    """Entry of `connwatch _worker`: take the primary's settings, bind, serve until told to stop."""
    channel = await ControlChannel.open(inherited_channel_socket(fd))
    first = await channel.receive()
    if first is None or first.get("op") != "init":
        raise RuntimeError("worker expected an init message from the primary")
    settings = load_settings(None, base=first["settings"], env={})
    configure_logging(settings.log.level, settings.log.format)
    worker = WorkerProcess(settings, index, channel)
    await worker.start()
    for listener, states in first.get("states", {}).items():
        for label, state in states.items():
            worker.daemon.set_target_state(listener, label, HealthState(state))
    await channel.send({"ok": True, "result": True})
    await worker.run()
