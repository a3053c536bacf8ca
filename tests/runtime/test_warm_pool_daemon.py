"""The warm pool in the daemon process: `workers: 2` (a pool per process, metrics merged), SIGHUP
adding and removing a pooled target, and SIGTERM (SPEC sections 8 and 9)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.proxy.test_warm_pool import LateGreeter, echo_once, pool_listener
from tests.support import DaemonProcess, daemon_config, eventually
from tests.variant import skip_under

_POOLS_PER_WORKER = skip_under(
    "workers2",
    "warm pools are per worker process (docs/upstream-pool.md), so a target holds min_idle per "
    "worker; test_each_worker_keeps_its_own_pool_and_metrics_are_merged covers workers: 2",
)


def pool_metric(m: dict[str, float], name: str, upstream: str, **labels: str) -> float | None:
    """The sample of `name` for listener app and `upstream` (and `labels`), whatever the order
    prometheus_client writes the labels in; None when the series does not exist."""
    want = {"listener": "app", "upstream": upstream, **labels}
    for key, value in m.items():
        if not key.startswith(name + "{"):
            continue
        pairs = dict(p.split("=", 1) for p in key[len(name) + 1 : -1].split(","))
        if {k: v.strip('"') for k, v in pairs.items()} == want:
            return value
    return None


async def test_each_worker_keeps_its_own_pool_and_metrics_are_merged(tmp_path: Path) -> None:
    up = await LateGreeter().start()
    try:
        cfg = daemon_config(pool_listener([up.address], min_idle=2, grow=False), workers=2)
        async with DaemonProcess(tmp_path, cfg) as daemon:
            await daemon.wait_for("worker_started")
            await eventually(lambda: up.open_connections() == 4)  # two processes, two each

            async def idle() -> float | None:
                m = await daemon.metrics()
                return pool_metric(m, "connwatch_upstream_pool_idle", up.address) == 4

            await eventually(idle)
            port = daemon.port("app")
            for i in range(20):
                assert await echo_once(port, b"c%02d" % i) == b"c%02d" % i

            async def settled() -> dict[str, float] | None:
                m = await daemon.metrics()
                return m if m['connwatch_connections_active{listener="app"}'] == 0 else None

            m = await eventually(settled)
            hits = pool_metric(m, "connwatch_upstream_pool_borrows_total", up.address, result="hit")
            misses = pool_metric(
                m, "connwatch_upstream_pool_borrows_total", up.address, result="miss"
            )
            assert hits is not None
            assert misses is not None
            assert hits + misses == 20
            assert hits > 0
            assert m['connwatch_connections_accepted_total{listener="app"}'] == 20
            assert pool_metric(m, "connwatch_upstream_connections_active", up.address) == 0
        assert len(daemon.find("shutdown_complete")) == 2
        await eventually(lambda: up.open_connections() == 0)  # every pool closed at shutdown
    finally:
        await up.close()


@_POOLS_PER_WORKER
async def test_reload_adds_a_pooled_target_and_closes_a_removed_ones_pool(tmp_path: Path) -> None:
    a = await LateGreeter().start()
    b = await LateGreeter().start()
    try:
        cfg = daemon_config(pool_listener([a.address], min_idle=2, grow=False))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            await eventually(lambda: a.open_connections() == 2)
            cfg["listeners"][0]["upstreams"] = [b.address]
            cfg["listeners"][0]["upstream_pool"]["min_idle"] = 3
            daemon.write_config(cfg)
            daemon.signal(signal.SIGHUP)
            await daemon.wait_for("config_reloaded")
            await eventually(lambda: a.open_connections() == 0)  # the removed target's pool
            await eventually(lambda: b.open_connections() == 3)  # new target, new settings
            m = await daemon.metrics()
            assert pool_metric(m, "connwatch_upstream_pool_idle", a.address) is None
            assert pool_metric(m, "connwatch_upstream_pool_idle", b.address) == 3
            assert await echo_once(daemon.port("app"), b"after") == b"after"

            # Pool off by reload: every pooled connection closed.
            cfg["listeners"][0]["upstream_pool"]["enabled"] = False
            daemon.write_config(cfg)
            daemon.signal(signal.SIGHUP)
            await daemon.wait_for("config_reloaded", count=2)
            await eventually(lambda: b.open_connections() == 0)
            m = await daemon.metrics()
            assert pool_metric(m, "connwatch_upstream_pool_idle", b.address) is None
            assert await echo_once(daemon.port("app"), b"plain") == b"plain"
            await asyncio.sleep(0)
    finally:
        await a.close()
        await b.close()
