"""The daemon inside `connwatch demo`: the real `runtime.daemon.Daemon` in this process, and
the `Snapshot` that `connwatch top` would fetch over HTTP, read from it directly."""

from __future__ import annotations

import errno
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Final

from connwatch.commands.demo.upstream import LOOPBACK
from connwatch.commands.top.model import Snapshot, Totals, upstreams_from_readiness
from connwatch.commands.top.upstreams_table import target_rows

if TYPE_CHECKING:
    from connwatch.runtime.daemon import Daemon
    from connwatch.snapshots import DaemonStats

__all__ = [
    "ADMIN_PORT",
    "LISTENER",
    "daemon_snapshot",
    "demo_config",
    "start_daemon",
    "totals_from_stats",
]

ADMIN_PORT: Final = 9464
LISTENER: Final = "demo"


def demo_config(upstream: str, admin_port: int) -> dict[str, Any]:
    """The demo's daemon config: short intervals so that states show within seconds."""
    return {
        "admin": {"listen": f"{LOOPBACK}:{admin_port}"},
        "log": {"level": "info", "format": "json"},
        "shutdown": {"drain_timeout": "2s", "quiet_period": "200ms"},
        "listeners": [
            {
                "name": LISTENER,
                "listen": f"{LOOPBACK}:0",
                "upstreams": [upstream],
                "buffer_size": "64KiB",
                "heartbeat": {"interval": "1s", "max_interval": "3s", "stall_timeout": "10s"},
                "health_check": {
                    "type": "tcp",
                    "interval": "1s",
                    "max_interval": "5s",
                    "timeout": "1s",
                    "rise": 1,
                    "fall": 2,
                },
            }
        ],
    }


async def start_daemon(upstream: str) -> Daemon:
    """The daemon with its admin endpoint on 9464, or on a free port when 9464 is taken."""
    from connwatch.config import load_settings
    from connwatch.runtime.daemon import Daemon

    for port in (ADMIN_PORT, 0):
        settings = load_settings(None, base=demo_config(upstream, port), env={})
        daemon = Daemon(settings)
        try:
            await daemon.start()
        except OSError as exc:
            if port == 0 or exc.errno != errno.EADDRINUSE:
                raise
            continue
        return daemon
    raise AssertionError("unreachable")


def totals_from_stats(stats: DaemonStats) -> Totals:
    closed: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    liveness: Counter[str] = Counter()
    for name, ls in stats.listeners.items():
        closed.update(ls.closed)
        nbytes.update(ls.bytes)
        if name in stats.liveness:
            liveness.update(stats.liveness[name].states)
    return Totals(
        active=sum(ls.active for ls in stats.listeners.values()),
        accepted=sum(ls.accepted for ls in stats.listeners.values()),
        closed=dict(closed),
        bytes=dict(nbytes),
        liveness=dict(liveness),
    )


async def daemon_snapshot(daemon: Daemon) -> Snapshot:
    """What `connwatch top` would fetch over HTTP, read from the daemon in this process."""
    totals = totals_from_stats(daemon.statistics())
    connections = await daemon.connection_records(None, None, None)
    _, body = await daemon.readiness()
    ready, upstreams = upstreams_from_readiness(body)
    clients = await daemon.backend.client_records(None, "active", 200)
    targets = target_rows(await daemon.backend.upstreams())
    return Snapshot(
        time.monotonic(), connections, totals, upstreams, ready, clients=clients, targets=targets
    )
