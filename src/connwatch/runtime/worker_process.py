"""A worker process of `workers: N`: the listeners and data plane of one process, driven by the
primary over its control socket (see worker_pool.py and control_channel.py). It runs a Daemon with
`role=Role.WORKER`: no admin endpoint, no health checks of its own."""

from __future__ import annotations

import asyncio
import contextlib
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
from connwatch.runtime.upgrade.sockets import export_listeners, inherited_sockets
from connwatch.snapshots import stats_to_wire

log = structlog.get_logger("connwatch.worker")

_FINAL_WAIT = 10.0  # seconds, after draining, for the primary to take our final figures


class WorkerProcess:
    """One worker: a WORKER-role Daemon and the control channel it answers the primary on; the
    primary relays target health to it."""

    def __init__(
        self, settings: Settings, index: int, channel: ControlChannel, *, id_base: int = 0
    ) -> None:
        self.index = index
        self.channel = channel
        self.daemon = Daemon(settings, worker_index=id_base + index, role=Role.WORKER)
        self._told_to_stop = False  # by the primary: it waits for our final statistics
        self._final = False  # drained: nothing more will change our figures

    async def start(self) -> None:
        await self.daemon.start()
        log.info("worker_started", worker=self.index)

    async def run(self) -> None:
        """Serve the primary until it says stop or goes away (or SIGTERM), then drain and stop."""
        daemon = self.daemon
        install_worker_signals(daemon.request_stop)
        # Not one of the daemon's tasks: it answers the primary during and after the drain,
        # until the primary has our final figures and hangs up.
        control = asyncio.get_running_loop().create_task(
            serve_control(self.channel, self._handlers(), stop_ends=False)
        )
        stop = daemon.tasks.spawn(daemon.wait_stop_requested())
        try:
            await asyncio.wait({control, stop}, return_when=asyncio.FIRST_COMPLETED)
            await daemon.shutdown()  # the primary said stop, or went away
            self._final = True  # our `stats` answers are final now
            if self._told_to_stop and not control.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_FINAL_WAIT):
                        await asyncio.shield(control)
        finally:
            try:
                await daemon.tasks.cancel(stop)
                control.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await control
            finally:
                self.channel.close()

    def _handlers(self) -> dict[str, Handler]:
        return {
            "init": self._op_init,
            "stats": self._op_stats,
            "connections": self._op_connections,
            "close": self._op_close,
            "clients": self._op_clients,
            "health": self._op_health,
            "outcomes": self._op_outcomes,
            "reload": self._op_reload,
            "stop": self._op_stop,
            "force": self._op_force,
            "export": self._op_export,
            "release": self._op_release,
        }

    async def _op_init(self, args: dict[str, Any]) -> bool:
        return True  # settings and states were applied before serving (see run_worker)

    async def _op_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        wire = stats_to_wire(self.daemon.statistics())
        if self._final:
            wire["final"] = True  # the primary keeps these (counters never go back)
        return wire

    async def _op_connections(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return self.daemon.local_records(
            args.get("listener"), args.get("min_idle"), args.get("limit")
        )

    async def _op_clients(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return self.daemon.backend.local_client_records(args.get("listener"))

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
        self._told_to_stop = True
        self.daemon.request_stop()
        return True

    async def _op_force(self, args: dict[str, Any]) -> bool:
        """The primary got a second stop signal: skip our drain too."""
        self.daemon.ordered_shutdown.force()
        return True

    async def _op_export(self, args: dict[str, Any]) -> bool:
        """Seamless upgrade: send our listening sockets to the primary's upgrade socket."""
        await export_listeners(self.daemon.listeners, str(args["path"]), self.index)
        return True

    async def _op_release(self, args: dict[str, Any]) -> bool:
        """Seamless upgrade: a successor accepts on our sockets now; stop accepting, drain next."""
        for listener in self.daemon.listeners.values():
            listener.release()
        return True


async def run_worker(index: int, fd: int) -> None:
    """Entry of `connwatch _worker`: take the primary's settings, bind, serve until told to stop."""
    channel = await ControlChannel.open(inherited_channel_socket(fd))
    first = await channel.receive()
    if first is None or first.get("op") != "init":
        raise RuntimeError("worker expected an init message from the primary")
    settings = load_settings(None, base=first["settings"], env={})
    configure_logging(settings.log.level, settings.log.format)
    worker = WorkerProcess(settings, index, channel, id_base=int(first.get("id_base", 0)))
    worker.daemon.state.inherited.update(inherited_sockets(first.get("inherited", {})))
    await worker.start()
    for listener, states in first.get("states", {}).items():
        for label, state in states.items():
            worker.daemon.set_target_state(listener, label, HealthState(state))
    await channel.send({"ok": True, "result": True})
    await worker.run()
