"""Seamless upgrade under load (SPEC section 11, issue 13): new connections at about 200 a second,
each a byte-exact echo, and long transfers running through each upgrade. Across every upgrade:
no client refused or reset, no byte corrupted, every long transfer completes through the old
process, the old process exits 0 within its drain bound, the new one serves everything after;
connwatch_connections_accepted_total and connwatch_bytes_total, read from the admin port every
100 ms, never decrease and end equal to what the clients counted.

Sizes: 20 long transfers of 64 MiB each (the issue's figures), about 100 s for the five upgrades
on a loaded 2-core machine; UPGRADE_TEST_TRANSFER_MIB scales them down for a quick local run
(the variable must not start with CONNWATCH_: the daemon would read it as a config override).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.upgrade_support import successor, upgrade_path
from tests.support import LOOPBACK, DaemonProcess, daemon_config, http_request, listener_config
from tests.support import parse_metrics as parse

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TRANSFERS = 20
TRANSFER_BYTES = int(os.environ.get("UPGRADE_TEST_TRANSFER_MIB", "64")) * 1024 * 1024
RATE = 200  # new short connections a second
STALL_REPORT_S = 60.0  # seconds after the release: transfers still moving then are reported
DRAIN_TIMEOUT = 120.0  # seconds: the old process's drain bound in these tests
ACCEPTED = 'connwatch_connections_accepted_total{listener="app"}'
C2U = 'connwatch_bytes_total{direction="client_to_upstream",listener="app"}'
U2C = 'connwatch_bytes_total{direction="upstream_to_client",listener="app"}'

_PATTERN_LEN = 1024 * 1024 + 7  # odd length: chunks never line up with the pattern
_PATTERN = random.Random(13).randbytes(_PATTERN_LEN)
_DOUBLED = _PATTERN + _PATTERN
_CHUNK = 128 * 1024

# An echo upstream in its own process (so the clients have this one's CPU), with flow control.
_UPSTREAM = """
import asyncio, sys
class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
    def data_received(self, data):
        self.t.write(data)
    def eof_received(self):
        self.t.close()
    def pause_writing(self):
        self.t.pause_reading()
    def resume_writing(self):
        self.t.resume_reading()
async def main():
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


@dataclass
class Tally:
    """What the clients counted."""

    connections: int = 0
    ok: int = 0
    refused: int = 0
    reset: int = 0
    corrupted: int = 0
    other: list[str] = field(default_factory=list)
    sent: int = 0
    received: int = 0

    def bad(self) -> dict[str, Any]:
        return {
            "refused": self.refused,
            "reset": self.reset,
            "corrupted": self.corrupted,
            "other": self.other[:5],
        }


async def short_client(port: int, rng: random.Random, tally: Tally) -> None:
    payload = rng.randbytes(rng.randint(64, 2048))
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
    except ConnectionRefusedError:
        tally.refused += 1
        return
    tally.connections += 1
    try:
        writer.write(payload)
        writer.write_eof()
        tally.sent += len(payload)
        echoed = await reader.read()
        tally.received += len(echoed)
        if echoed == payload:
            tally.ok += 1
        else:
            tally.corrupted += 1
    except ConnectionResetError:
        tally.reset += 1
    except OSError as exc:
        tally.other.append(repr(exc))
    finally:
        writer.close()


async def short_load(port: int, stop: asyncio.Event, tally: Tally, seed: int) -> None:
    """About RATE new connections a second until `stop`; each one awaited at the end."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    started = loop.time()
    for n in range(RATE * 120):  # bounded: 2 minutes at most
        if stop.is_set():
            break
        task = loop.create_task(short_client(port, rng, tally))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        await asyncio.sleep(max(0.0, started + (n + 1) / RATE - loop.time()))
    if tasks:
        await asyncio.wait(tasks, timeout=60)


@dataclass
class Transfer:
    index: int
    port: int = 0  # the client's local port: finds its sockets in `ss` if it stalls
    sent: int = 0
    received: int = 0
    corrupted: bool = False
    ended_at: float = 0.0
    error: str | None = None


async def long_transfer(port: int, transfer: Transfer, released: asyncio.Event, tally: Tally):
    """Trickle (never quiet) until the old process has released its listeners, then send the
    rest at full speed; compare every byte echoed."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    transfer.port = writer.get_extra_info("sockname")[1]
    tally.connections += 1
    offset = transfer.index * 7919

    async def send() -> None:
        while transfer.sent < TRANSFER_BYTES:
            size = min(_CHUNK if released.is_set() else 4096, TRANSFER_BYTES - transfer.sent)
            start = (offset + transfer.sent) % _PATTERN_LEN
            writer.write(_DOUBLED[start : start + size])
            transfer.sent += size
            await writer.drain()
            if not released.is_set():
                await asyncio.sleep(0.02)
        writer.write_eof()

    async def receive() -> None:
        while data := await reader.read(_CHUNK):
            start = (offset + transfer.received) % _PATTERN_LEN
            if data != _DOUBLED[start : start + len(data)]:
                transfer.corrupted = True
            transfer.received += len(data)

    try:
        await asyncio.gather(send(), receive())
    except OSError as exc:
        transfer.error = repr(exc)
    finally:
        transfer.ended_at = time.monotonic()
        writer.close()
    tally.sent += transfer.sent
    tally.received += transfer.received


class Sampler:
    """Reads the admin port's counters every 100 ms."""

    def __init__(self, admin_port: int) -> None:
        self.port = admin_port
        self.samples: list[tuple[float, float, float]] = []
        self.failures = 0

    async def run(self, stop: asyncio.Event) -> None:
        for _ in range(20 * 60 * 10):  # bounded: 20 minutes at 100 ms
            if stop.is_set():
                return
            try:
                status, body = await http_request("GET", self.port, "/metrics")
            except OSError:
                self.failures += 1
            else:
                if status == 200:
                    m = parse(body.decode())
                    self.samples.append((m[ACCEPTED], m[C2U], m[U2C]))
            await asyncio.sleep(0.1)

    def decreases(self) -> list[tuple[int, tuple[float, ...], tuple[float, ...]]]:
        return [
            (i, a, b)
            for i, (a, b) in enumerate(zip(self.samples, self.samples[1:], strict=False))
            if any(y < x for x, y in zip(a, b, strict=True))
        ]


async def upgrade_under_load(
    tmp_path: Path, workers: list[int], port: int, cfg: dict[str, Any], first: DaemonProcess
) -> tuple[DaemonProcess, list[dict[str, Any]], Tally, Sampler]:
    """Upgrade `first` len(workers) times under load; each successor uses the next `workers`."""
    tally = Tally()
    sampler = Sampler(first.admin_port)
    stop_sampling = asyncio.Event()
    sampling = asyncio.get_running_loop().create_task(sampler.run(stop_sampling))
    current = first
    figures: list[dict[str, Any]] = []
    load: list[asyncio.Task[None]] = []
    try:
        for run, count in enumerate(workers):
            before = (tally.connections, tally.sent, tally.received)
            stop_short = asyncio.Event()
            released = asyncio.Event()
            shorts = asyncio.get_running_loop().create_task(
                short_load(port, stop_short, tally, seed=run)
            )
            transfers = [Transfer(i) for i in range(TRANSFERS)]
            streams = [long_transfer(port, t, released, tally) for t in transfers]
            moving = asyncio.get_running_loop().create_task(_gather(streams))
            load[:] = [shorts, moving]
            await asyncio.sleep(0.5)  # short connections and trickling transfers before
            began = time.monotonic()
            new = await successor(tmp_path, f"run{run}", {**cfg, "workers": count})
            await current.wait_for("upgrade_released", role="handed_over", timeout=30)
            released_at = time.monotonic()
            released.set()
            try:
                await asyncio.wait_for(asyncio.shield(moving), STALL_REPORT_S)
            except TimeoutError:
                await report_stall(transfers, new.admin_port, port)
                await moving
            code = await current.wait_exit(DRAIN_TIMEOUT + 15)
            exited_at = time.monotonic()
            await new.wait_for("upgrade_complete", role="took_over", timeout=30)
            await asyncio.sleep(0.5)  # the new one serves short connections alone
            stop_short.set()
            await shorts
            figures.append(
                {
                    "run": run + 1,
                    "workers": count,
                    "takeover_s": round(released_at - began, 3),
                    "old_exit_code": code,
                    "old_drained_s": round(exited_at - released_at, 3),
                    "transfers_after_release": sum(t.ended_at > released_at for t in transfers),
                    "transfers_complete": sum(t.received == TRANSFER_BYTES for t in transfers),
                    "transfer_errors": [t.error for t in transfers if t.error],
                    "transfers_corrupted": sum(t.corrupted for t in transfers),
                    "transfers_incomplete": sum(t.received != TRANSFER_BYTES for t in transfers),
                    "connections": tally.connections - before[0],
                    "bytes_sent": tally.sent - before[1],
                    "bytes_echoed": tally.received - before[2],
                    "short_ok_so_far": tally.ok,
                    **tally.bad(),
                }
            )
            print("upgrade under load:", figures[-1])  # at once: a later failure keeps them
            current = new
    finally:
        for task in load:  # a step failed: stop the load, or the test hangs until killed
            task.cancel()
        await asyncio.gather(*load, return_exceptions=True)
        stop_sampling.set()
        await sampling
    return current, figures, tally, sampler


async def report_stall(transfers: list[Transfer], admin_port: int, port: int) -> None:
    """Transfers still moving STALL_REPORT_S after the release (they take seconds): print what
    each holds, their sockets' kernel queues and the old process's records of them, then go on
    waiting (the drain bound decides pass or fail)."""
    stuck = [t for t in transfers if not t.ended_at]
    print("STALL after release:", stuck)
    ports = " or ".join(f"sport = :{t.port} or dport = :{t.port}" for t in stuck)
    ss = await asyncio.create_subprocess_exec(
        "ss", "-tinoem", f"( {ports} )", stdout=asyncio.subprocess.PIPE
    )
    print((await ss.communicate())[0].decode())
    status, body = await http_request("GET", admin_port, "/connections?listener=app&min_idle=5")
    print("connections idle 5 s or more (the old process's among them):", status, body.decode())


async def _gather(coros: list[Any]) -> None:
    await asyncio.gather(*coros)


async def _upstream() -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _UPSTREAM, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    port = int(await asyncio.wait_for(proc.stdout.readline(), 15))
    return proc, port


async def _run(tmp_path: Path, workers: list[int]) -> None:
    path = upgrade_path(tmp_path)
    upstream, upstream_port = await _upstream()
    try:
        listener = listener_config("app", [f"{LOOPBACK}:{upstream_port}"], max_connections=100_000)
        cfg = daemon_config(
            listener,
            upgrade_socket=path,
            workers=workers[0],
            # No quiet-gap closing in the drain: on a loaded 2-core machine a scheduling stall of
            # the echo process or of this one looks like a quiet gap and would (rightly) close a
            # transfer. The drain is otherwise the SIGTERM one.
            shutdown={"drain_timeout": f"{DRAIN_TIMEOUT:g}s", "quiet_close": False},
            log={"level": "info", "connection_events": False},
        )
        first = await DaemonProcess(tmp_path, cfg).start()
        port = first.port("app")
        last = first
        try:
            last, figures, tally, sampler = await upgrade_under_load(
                tmp_path, workers[1:], port, cfg, first
            )
            final = parse((await http_request("GET", last.admin_port, "/metrics"))[1].decode())
            print(
                "clients:",
                tally,
                "samples:",
                len(sampler.samples),
                "decreasing:",
                len(sampler.decreases()),
            )
            # Why a client was refused or reset, if one was (carried over every upgrade).
            print("closed:", {k: v for k, v in final.items() if "connections_closed_total" in k})
            for line in figures:
                assert line["old_exit_code"] == 0, line
                assert line["old_drained_s"] < DRAIN_TIMEOUT, line
                assert line["transfers_after_release"] == TRANSFERS, line
                assert not line["transfer_errors"], line
                assert line["transfers_corrupted"] == 0, line
                assert line["transfers_incomplete"] == 0, line
            assert tally.bad() == {"refused": 0, "reset": 0, "corrupted": 0, "other": []}
            assert sampler.decreases() == []
            assert len(sampler.samples) > 10 * len(figures)
            assert final[ACCEPTED] == tally.connections
            assert final[C2U] == tally.sent
            assert final[U2C] == tally.received
            assert tally.sent == tally.received
        finally:
            assert await last.stop() == 0
            for process in (first,):
                await process.stop()
    finally:
        upstream.kill()
        await upstream.wait()


async def test_five_upgrades_in_a_row_under_load(tmp_path: Path) -> None:
    await _run(tmp_path, [2, 2, 2, 2, 2, 2])


async def test_workers_two_to_one_and_back_under_load(tmp_path: Path) -> None:
    await _run(tmp_path, [2, 1, 2])
