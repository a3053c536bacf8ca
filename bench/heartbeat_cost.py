"""CPU cost of the heartbeat watchdog: N idle proxied connections through a real daemon.

For each round and mode (heartbeats `off`, then `on` at interval = max_interval = 1 s), this
starts a silent upstream (in this process), a `connwatch run` subprocess and two client
processes holding N/2 idle connections each (one process may hold at most ~9,900 proxied
connections under the 20,000 open-files limit), checks the daemon really holds N open
connections, then reads the daemon's utime+stime from /proc/PID/stat over `--seconds` and prints
its CPU as a percentage of one core, with the heartbeats counted over the same window.

    python -m bench.heartbeat_cost --connections 8000 --seconds 20 --rounds 2

The figure that matters is `on - off` of the same round: the watchdog's cost. Other work on the
machine's two cores shows up in both modes; run several rounds and compare.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"
CLIENT_PROCESSES = 2
START_TIMEOUT = 30.0  # seconds for the daemon to log daemon_started
OPEN_TIMEOUT = 120.0  # seconds for all clients to connect


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- client role: hold idle connections until stdin closes ------------------------------------------
async def hold_connections(port: int, count: int, concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)
    writers: list[asyncio.StreamWriter] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with gate:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 10)
                writers.append(writer)
            except (OSError, TimeoutError):
                failed += 1

    await asyncio.gather(*(one() for _ in range(count)))
    print(json.dumps({"open": len(writers), "failed": failed}), flush=True)
    await asyncio.to_thread(sys.stdin.read)  # the harness closes our stdin to end us
    for writer in writers:
        writer.close()


# -- harness ------------------------------------------------------------------------------------------
class _Silent(asyncio.Protocol):
    """The upstream: accepts and never says a word."""

    opened = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _Silent.opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        _Silent.opened -= 1


def daemon_config(upstream_port: int, heartbeats: bool) -> dict[str, Any]:
    heartbeat: dict[str, Any] = {"enabled": heartbeats}
    if heartbeats:
        heartbeat.update(interval="1s", max_interval="1s", failure_threshold=3)
    return {
        "admin": {"listen": f"{LOOPBACK}:0"},
        "log": {"level": "info", "connection_events": True},
        "listeners": [
            {
                "name": "bench",
                "listen": f"{LOOPBACK}:0",
                "upstreams": [f"{LOOPBACK}:{upstream_port}"],
                "max_connections": 20000,
                "health_check": {"enabled": False},
                "heartbeat": heartbeat,
            }
        ],
    }


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def scrape(admin_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{admin_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+)\s+(\S+)$", line)
        if m and not line.startswith("#"):
            out[m.group(1)] = float(m.group(2))
    return out


async def wait_log(path: Path, event: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in (await asyncio.to_thread(path.read_text)).splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == event:
                    return dict(record)
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no {event!r} in {path} within {timeout}s")


@contextlib.asynccontextmanager
async def daemon(workdir: Path, config: dict[str, Any]) -> AsyncIterator[tuple[int, int, int]]:
    """Yields (pid, listener port, admin port); SIGTERM (then SIGKILL) by PID afterwards."""
    cfg = workdir / "connwatch.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = workdir / "daemon.log"
    with out.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "connwatch", "run", "-c", str(cfg),
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        started = await wait_log(out, "daemon_started", START_TIMEOUT)
        listening = await wait_log(out, "listener_started", 1)
        yield proc.pid, int(listening["port"]), int(started["admin_port"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def clients(port: int, total: int) -> AsyncIterator[int]:
    """CLIENT_PROCESSES processes holding `total` idle connections; yields how many opened."""
    share = -(-total // CLIENT_PROCESSES)
    procs = []
    for i in range(CLIENT_PROCESSES):
        argv = ["--client-port", str(port), "--connections", str(min(share, total - i * share))]
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.heartbeat_cost",
                *argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        )
    try:
        opened = 0
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), OPEN_TIMEOUT)
            opened += int(json.loads(line)["open"])
        yield opened
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_active(admin_port: int, want: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    key = 'connwatch_connections_active{listener="bench"}'
    active = 0.0
    while time.monotonic() < deadline:
        active = (await asyncio.to_thread(scrape, admin_port)).get(key, 0.0)
        if active >= want:
            return active
        await asyncio.sleep(0.5)
    return active


async def measure(connections: int, seconds: float, heartbeats: bool) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(_Silent, LOOPBACK, 0, backlog=4096)
    port = upstream.sockets[0].getsockname()[1]
    try:
        with tempfile.TemporaryDirectory(prefix="cw-hb-") as tmp:
            config = daemon_config(port, heartbeats)
            async with daemon(Path(tmp), config) as (pid, listen_port, admin_port):  # noqa: SIM117
                async with clients(listen_port, connections) as opened:  # needs listen_port
                    active = await wait_active(admin_port, connections, 30)
                    await asyncio.sleep(3)  # let the opening burst and first beats settle
                    beats_key = 'connwatch_heartbeats_total{listener="bench",result="ok"}'
                    before = await asyncio.to_thread(scrape, admin_port)
                    cpu0, t0 = cpu_seconds(pid), time.monotonic()
                    await asyncio.sleep(seconds)
                    cpu1, t1 = cpu_seconds(pid), time.monotonic()
                    after = await asyncio.to_thread(scrape, admin_port)
                    failed_key = beats_key.replace('result="ok"', 'result="failed"')
                    states = {
                        key.split('state="')[1].rstrip('"}'): int(value)
                        for key, value in after.items()
                        if key.startswith("connwatch_connections_liveness{") and value
                    }
                    return {
                        "mode": "on" if heartbeats else "off",
                        "connections": connections,
                        "clients_open": opened,
                        "daemon_active": int(active),
                        "upstream_open": _Silent.opened,
                        "cpu_pct": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
                        "beats_per_s": round(
                            (after.get(beats_key, 0) - before.get(beats_key, 0)) / (t1 - t0), 1
                        ),
                        "failed_beats": int(after.get(failed_key, 0)),
                        "liveness": states,
                        "seconds": round(t1 - t0, 1),
                    }
    finally:
        upstream.close()


async def harness(args: argparse.Namespace) -> None:
    print(f"# command: python -m bench.heartbeat_cost {' '.join(sys.argv[1:])}", flush=True)
    rows = []
    for n in range(args.rounds):
        for heartbeats in (False, True):
            row = await measure(args.connections, args.seconds, heartbeats)
            row["round"] = n + 1
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("round  off %CPU  on %CPU  heartbeat cost (%CPU of one core)  beats/s")
    for n in range(args.rounds):
        off, on = rows[2 * n], rows[2 * n + 1]
        cost = on["cpu_pct"] - off["cpu_pct"]
        print(
            f"{n + 1:>5}  {off['cpu_pct']:>8.2f}  {on['cpu_pct']:>7.2f}  {cost:>34.2f}"
            f"  {on['beats_per_s']:>7.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=8000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client-port", type=int, help=argparse.SUPPRESS)  # client role
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 9900 * CLIENT_PROCESSES or args.rounds < 1:
        parser.error("--connections 1..19800 and --rounds >= 1")
    raise_nofile()  # inherited by the daemon and the clients
    if args.client_port is not None:
        asyncio.run(hold_connections(args.client_port, args.connections, concurrency=200))
    else:
        asyncio.run(harness(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
