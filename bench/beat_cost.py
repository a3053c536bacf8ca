"""CPU cost of one heartbeat, in process: µs of this thread's CPU time per connection-beat.

N idle connections proxied by a real `Listener` (uvloop, loopback, a silent upstream in this
process), watched by a `Watchdog`; every connection is beaten `--rounds` times through
`Watchdog.beat`, the same path the timer wheel runs. Thread CPU time, not wall time, so another
job on a shared core counts less; the best of `--repeats` is the least disturbed. For an A/B,
run each checkout in turn, alternating, with PYTHONPATH at its src/:

    python -m bench.beat_cost --connections 2000 --data-path portable --rounds 5 --repeats 5

The daemon-level figure (CPU % of a core for 8,000 beats a second) is `bench/run.py heartbeat`.
Each process here holds four sockets per connection, so at most ~4,900 connections fit under
the 20,000 open-files limit.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from connwatch._types import CloseReason
from connwatch.config import load_settings
from connwatch.liveness.watchdog import Watchdog
from connwatch.observe.tracker import Tracker
from connwatch.proxy.connection import MonitoredConnection
from connwatch.proxy.listener import Listener

LOOPBACK = "127.0.0.1"
OPEN_TIMEOUT = 60.0  # seconds for all connections to be proxied


def _config(upstream_port: int, data_path: str) -> dict[str, object]:
    slow = "3600s"  # the wheel's own beats never come during the measurement
    return {
        "log": {"level": "warning"},
        "listeners": [
            {
                "name": "beat",
                "listen": f"{LOOPBACK}:0",
                "upstreams": [f"{LOOPBACK}:{upstream_port}"],
                "data_path": data_path,
                "max_connections": 20000,
                "health_check": {"enabled": False},
                "heartbeat": {"enabled": True, "interval": slow, "max_interval": slow},
            }
        ],
    }


async def _open(port: int, count: int) -> list[socket.socket]:
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (LOOPBACK, port))
        clients.append(sock)
    return clients


async def _proxied(tracker: Tracker, count: int) -> list[MonitoredConnection]:
    deadline = time.monotonic() + OPEN_TIMEOUT
    while time.monotonic() < deadline:
        conns = [c for c in tracker.connections() if c.upstream_leg.transport is not None]
        if len(conns) >= count:
            return conns
        await asyncio.sleep(0.05)
    raise TimeoutError(f"only {len(conns)} of {count} connections proxied")


def _measure(watchdog: Watchdog, conns: list[MonitoredConnection], rounds: int) -> float:
    beat = watchdog.beat
    start = time.thread_time()
    for _ in range(rounds):
        for conn in conns:
            if beat(conn) is None:
                raise RuntimeError(f"{conn.id} was not beaten")
    return (time.thread_time() - start) / (rounds * len(conns)) * 1e6


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(asyncio.Protocol, LOOPBACK, 0, backlog=4096)
    settings = load_settings(
        None, base=_config(upstream.sockets[0].getsockname()[1], args.data_path), env={}
    )
    config = settings.listeners[0]
    watchdog = Watchdog()
    tracker = Tracker(log_events=False)
    listener = Listener(config, tracker, liveness=watchdog)
    await listener.start()
    watchdog.configure(listener.name, config)
    clients = await _open(listener.port, args.connections)
    try:
        conns = await _proxied(tracker, args.connections)
        runs = []
        for _ in range(args.repeats):
            runs.append(_measure(watchdog, conns, args.rounds))
            await asyncio.sleep(0)  # let the loop breathe between runs
        shown = " ".join(f"{r:.2f}" for r in runs)
        print(
            f"{args.data_path}: {len(conns)} connections, µs per beat best {min(runs):.2f}"
            f" (runs: {shown})",
            flush=True,
        )
    finally:
        for conn in list(tracker.connections()):
            conn.close(CloseReason.SHUTDOWN, abort=True)
        watchdog.close()
        listener.stop_accepting()
        upstream.close()
        for sock in clients:
            sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-path", choices=("portable", "splice"), default="portable")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 4900 or args.rounds < 1 or args.repeats < 1:
        parser.error("--connections 1..4900, --rounds and --repeats >= 1")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
