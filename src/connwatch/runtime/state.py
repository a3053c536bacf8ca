"""DaemonState: what the daemon's collaborators (reload, shutdown, admin backend, progress lines,
health events) share: the current settings, which a reload replaces, and the data plane's parts."""

from __future__ import annotations

import enum
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from connwatch._types import UpstreamOutcomes
from connwatch.config import Settings
from connwatch.health.monitor import HealthMonitor
from connwatch.liveness.watchdog import Watchdog
from connwatch.observe.connection_lines import ConnectionEvents
from connwatch.observe.tracker import Tracker
from connwatch.proxy.listener import Listener
from connwatch.runtime.task_owner import TaskOwner
from connwatch.runtime.worker_pool import WorkerPool

if TYPE_CHECKING:
    from connwatch.runtime.upgrade.takeover import Takeover


class Role(enum.StrEnum):
    """PRIMARY runs admin, health checks, the heartbeat responder and the other workers; a WORKER
    runs only listeners and the data plane, driven by the primary over its control socket."""

    PRIMARY = "primary"
    WORKER = "worker"


@dataclass(eq=False)
class DaemonState:
    settings: Settings  # replaced as a whole by a reload
    role: Role
    events: ConnectionEvents
    tracker: Tracker
    liveness: Watchdog | None
    health: HealthMonitor
    pool: WorkerPool
    tasks: TaskOwner
    listeners: dict[str, Listener]
    outcomes: UpstreamOutcomes | None = None  # passive health's sink, handed to every listener
    retired: list[Listener] = field(default_factory=list)  # removed by a reload; conns still run
    protocol_errors: Counter[str] = field(default_factory=Counter)
    reloads: Counter[str] = field(default_factory=Counter)
    started: bool = False
    draining: bool = False
    # seamless upgrade: listening sockets taken over from an old process, by listener name
    inherited: dict[str, list[socket.socket]] = field(default_factory=dict)
    predecessor: Takeover | None = None  # the old process this one took over from

    @property
    def checks_enabled(self) -> bool:
        """The primary checks upstreams; workers are told the results."""
        return self.role is Role.PRIMARY

    def count_protocol_error(self, kind: str) -> None:
        self.protocol_errors[kind] += 1

    def all_listeners(self) -> list[Listener]:
        """Running and retired listeners: the retired ones still carry connections and counts."""
        return [*self.listeners.values(), *self.retired]
