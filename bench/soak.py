"""Soak: N minutes of mixed traffic through a connwatch daemon subprocess, on loopback only.

    python -m bench.soak                      # 10 minutes, a sample every 10 s
    python -m bench.soak --minutes 60 --json soak.json

Traffic, all of it checked byte for byte in both directions (every stream is a deterministic
pattern derived from the connection's nonce, so both ends know what the other must send):

- churn: short connections (client sends and half-closes while the reply streams back);
- upstream-first: the upstream sends its reply and half-closes first, the client then sends;
- long-lived: echo connections that exchange a message every ~second for 30-120 s each;
- stalls: a client that reads part of a large reply, pauses (the daemon must pause the upstream
  instead of buffering), then reads the rest.

Every `--sample-interval` seconds the daemon's RSS and open fd count are read from /proc and a
row is printed. The verdict (exit 0 PASS, 1 FAIL): zero mismatches and zero errors; after the
warm-up, the average RSS of the last third of the samples is within `--tolerance` (10%) of the
first post-warm-up sample; the fd count net of open connections (fds - 2 x active), which moves
with the connections in flight at the instant of a sample, has a last-third average within the
tolerance (+2 fds) of the first third's; once the load stops and every connection has closed,
the fd count is back to its value before the load; and the daemon's byte counters equal the
bytes the clients sent and received.

`--no-heartbeat` turns the liveness watchdog off (to tell its effects from the proxy's).
Bounded: `--minutes` of load, `--max-conns` connections, every exchange under a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
PATTERN_LEN = 65521  # prime, so pattern repeats never line up with read sizes
HEADER = struct.Struct("!QBII")  # nonce, mode, client body length, reply length
STREAM, UPSTREAM_FIRST, ECHO = 0, 1, 2
READ = 64 * 1024
OP_TIMEOUT = 60.0  # seconds one exchange may take before it counts as an error
KiB, MiB = 1024, 1024 * 1024


# -- byte-exact streams -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _block(seed: int) -> bytes:
    data = random.Random(seed).randbytes(PATTERN_LEN)
    return data + data  # doubled: any PATTERN_LEN-long window is one slice


def pattern(seed: int, pos: int, length: int) -> bytes:
    """`length` bytes of the stream `seed`, from offset `pos`."""
    block = _block(seed)
    out = bytearray()
    while length > 0:
        off = pos % PATTERN_LEN
        n = min(length, PATTERN_LEN)
        out += block[off : off + n]
        pos += n
        length -= n
    return bytes(out)


def matches(seed: int, pos: int, data: bytes | bytearray) -> bool:
    """Whether `data` is the stream `seed` at offset `pos`."""
    block = _block(seed)
    view = memoryview(data)
    while view:
        off = pos % PATTERN_LEN
        n = min(len(view), PATTERN_LEN)
        if view[:n] != block[off : off + n]:
            return False
        view = view[n:]
        pos += n
    return True


def c2u_seed(nonce: int) -> int:
    return nonce * 2


def u2c_seed(nonce: int) -> int:
    return nonce * 2 + 1


@dataclass
class Tally:
    """What the load saw. Shared by clients and the upstream (one event loop)."""

    started: int = 0
    completed: Counter[str] = field(default_factory=Counter)  # by kind
    mismatches: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)
    sent: int = 0  # client bytes handed to the daemon (headers included)
    received: int = 0  # reply bytes the clients got back
    upstream_verified: int = 0  # client bytes the upstream received and checked

    def error(self, kind: str, exc: BaseException) -> None:
        self.errors[f"{kind}:{type(exc).__name__}"] += 1
        if len(self.first_errors) < 10:
            self.first_errors.append(f"{kind}: {exc!r}")

    def mismatch(self, where: str) -> None:
        self.mismatches += 1
        if len(self.first_errors) < 10:
            self.first_errors.append(f"mismatch: {where}")


# -- the upstream ---------------------------------------------------------------------------------
class SoakUpstream:
    """Serves the three modes, checking every byte the client sends."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, HOST, 0, backlog=1024)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            raw = await reader.read(HEADER.size)
            if not raw:  # the daemon's tcp health check: connect, then close
                return
            raw += await reader.readexactly(HEADER.size - len(raw))
            nonce, mode, send_len, reply_len = HEADER.unpack(raw)
            if mode == ECHO:
                await self._echo(nonce, reader, writer)
            elif mode == UPSTREAM_FIRST:
                await _send_pattern(writer, u2c_seed(nonce), reply_len)
                writer.write_eof()
                await self._verify(nonce, send_len, reader)
            else:
                sender = asyncio.ensure_future(_send_pattern(writer, u2c_seed(nonce), reply_len))
                try:
                    await self._verify(nonce, send_len, reader)
                    await sender
                finally:
                    sender.cancel()
                writer.write_eof()
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.tally.error("upstream", exc)
        finally:
            writer.close()

    async def _verify(self, nonce: int, expected: int, reader: asyncio.StreamReader) -> None:
        pos = 0
        while data := await reader.read(READ):
            if not matches(c2u_seed(nonce), pos, data):
                self.tally.mismatch(f"upstream got wrong bytes from {nonce} at {pos}")
            pos += len(data)
        self.tally.upstream_verified += HEADER.size + pos
        if pos != expected:
            self.tally.mismatch(f"upstream got {pos} of {expected} bytes from {nonce}")

    async def _echo(
        self, nonce: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        pos = 0
        while data := await reader.read(READ):
            if not matches(c2u_seed(nonce), pos, data):
                self.tally.mismatch(f"echo upstream got wrong bytes from {nonce} at {pos}")
            pos += len(data)
            writer.write(data)
            await writer.drain()
        self.tally.upstream_verified += HEADER.size + pos
        writer.write_eof()


async def _send_pattern(writer: asyncio.StreamWriter, seed: int, length: int, pos: int = 0) -> None:
    end = pos + length
    while pos < end:
        n = min(256 * KiB, end - pos)
        writer.write(pattern(seed, pos, n))
        await writer.drain()
        pos += n


# -- the clients ----------------------------------------------------------------------------------
class Load:
    """The client side: worker loops bounded by a deadline and a connection budget."""

    def __init__(self, port: int, tally: Tally, deadline: float, max_conns: int, seed: int):
        self.port = port
        self.tally = tally
        self.deadline = deadline
        self.budget = max_conns
        self.rng = random.Random(seed)
        self._nonces = iter(range(1, 2**62))

    def _take(self) -> int | None:
        """A fresh nonce while time and the connection budget last."""
        if time.monotonic() >= self.deadline or self.budget <= 0:
            return None
        self.budget -= 1
        self.tally.started += 1
        return next(self._nonces)

    async def _connect(self, nonce: int, mode: int, send_len: int, reply_len: int) -> Any:
        reader, writer = await asyncio.open_connection(HOST, self.port)
        writer.write(HEADER.pack(nonce, mode, send_len, reply_len))
        self.tally.sent += HEADER.size
        return reader, writer

    async def _read_reply(self, reader: asyncio.StreamReader, nonce: int, expected: int) -> None:
        pos = 0
        while data := await reader.read(READ):
            if not matches(u2c_seed(nonce), pos, data):
                self.tally.mismatch(f"client {nonce} got wrong reply bytes at {pos}")
            pos += len(data)
        self.tally.received += pos
        if pos != expected:
            self.tally.mismatch(f"client {nonce} got {pos} of {expected} reply bytes")

    async def _send(self, writer: asyncio.StreamWriter, nonce: int, length: int) -> None:
        await _send_pattern(writer, c2u_seed(nonce), length)
        self.tally.sent += length
        writer.write_eof()

    def _sizes(self) -> tuple[int, int]:
        big = self.rng.random() < 0.05
        top = 4 * MiB if big else 64 * KiB
        return self.rng.randrange(top), self.rng.randrange(top)

    async def churn_once(self, nonce: int) -> None:
        send_len, reply_len = self._sizes()
        upstream_first = self.rng.random() < 0.3
        mode = UPSTREAM_FIRST if upstream_first else STREAM
        reader, writer = await self._connect(nonce, mode, send_len, reply_len)
        try:
            if upstream_first:  # the upstream ends its side first; we send after its EOF
                await self._read_reply(reader, nonce, reply_len)
                await self._send(writer, nonce, send_len)
                await reader.read()
            else:
                sender = asyncio.ensure_future(self._send(writer, nonce, send_len))
                try:
                    await self._read_reply(reader, nonce, reply_len)
                    await sender
                finally:
                    sender.cancel()
        finally:
            writer.close()
        self.tally.completed["upstream_first" if upstream_first else "churn"] += 1

    async def stall_once(self, nonce: int) -> None:
        """Read a little of a large reply, stop reading for a while, then read the rest."""
        reply_len = self.rng.randrange(4 * MiB, 16 * MiB)
        reader, writer = await self._connect(nonce, STREAM, 0, reply_len)
        try:
            writer.write_eof()
            head = await reader.readexactly(min(reply_len, 128 * KiB))
            if not matches(u2c_seed(nonce), 0, head):
                self.tally.mismatch(f"stalled client {nonce} got wrong bytes")
            await asyncio.sleep(self.rng.uniform(1.0, 4.0))
            pos = len(head)
            while data := await reader.read(READ):
                if not matches(u2c_seed(nonce), pos, data):
                    self.tally.mismatch(f"stalled client {nonce} got wrong bytes at {pos}")
                pos += len(data)
            self.tally.received += pos
            if pos != reply_len:
                self.tally.mismatch(f"stalled client {nonce} got {pos} of {reply_len}")
        finally:
            writer.close()
        self.tally.completed["stall"] += 1

    async def long_lived_once(self, nonce: int) -> None:
        """An echo connection: a message a second for 30-120 s (never past the deadline)."""
        end = min(self.deadline, time.monotonic() + self.rng.uniform(30, 120))
        reader, writer = await self._connect(nonce, ECHO, 0, 0)
        pos = 0
        try:
            while time.monotonic() < end:
                n = self.rng.randrange(1, 32 * KiB)
                writer.write(pattern(c2u_seed(nonce), pos, n))
                self.tally.sent += n
                async with asyncio.timeout(OP_TIMEOUT):
                    back = await reader.readexactly(n)
                if not matches(c2u_seed(nonce), pos, back):
                    self.tally.mismatch(f"long-lived {nonce} echo differs at {pos}")
                self.tally.received += n
                pos += n
                await asyncio.sleep(self.rng.uniform(0.5, 1.5))
            writer.write_eof()
            if await reader.read() != b"":
                self.tally.mismatch(f"long-lived {nonce}: bytes after the echo ended")
        finally:
            writer.close()
        self.tally.completed["long_lived"] += 1

    async def worker(self, kind: str, once: Callable[[int], Awaitable[None]]) -> None:
        while (nonce := self._take()) is not None:
            try:
                limit = None if kind == "long_lived" else OP_TIMEOUT
                async with asyncio.timeout(limit):
                    await once(nonce)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self.tally.error(kind, exc)
            if kind == "stall":
                await asyncio.sleep(self.rng.uniform(0.5, 2.0))


# -- the daemon -----------------------------------------------------------------------------------
class Daemon:
    """`python -m connwatch run -c FILE` in its own session; its JSON log lines are counted."""

    def __init__(self, workdir: Path, upstream_port: int, opts: Options) -> None:
        self.config = workdir / "connwatch.yaml"
        self.config.write_text(json.dumps(_daemon_config(upstream_port, opts)))
        self.stderr_path = workdir / "stderr.txt"
        self.proc: asyncio.subprocess.Process | None = None
        self.events: Counter[str] = Counter()
        self.levels: Counter[str] = Counter()
        self.warnings: list[dict[str, Any]] = []  # the first few warning/error lines
        self.admin_port = 0
        self.port = 0
        self._started = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with self.stderr_path.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "connwatch", "run", "-c", str(self.config),
                stdout=subprocess.PIPE, stderr=err, start_new_session=True,
            )  # fmt: skip
        self._reader = asyncio.ensure_future(self._read())
        async with asyncio.timeout(20):
            await self._started.wait()

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            try:
                line = json.loads(raw)
            except ValueError:
                self.events["_unparsed"] += 1
                continue
            self.events[line.get("event", "?")] += 1
            self.levels[line.get("level", "?")] += 1
            if line.get("level") in ("warning", "error") and len(self.warnings) < 5:
                self.warnings.append(line)
            if line.get("event") == "listener_started":
                self.port = int(line["port"])
            elif line.get("event") == "daemon_started":
                self.admin_port = int(line["admin_port"])
                self._started.set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(40):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._reader
        return self.proc.returncode or 0

    async def metrics(self) -> dict[str, float]:
        reader, writer = await asyncio.open_connection(HOST, self.admin_port)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
            async with asyncio.timeout(10):
                raw = await reader.read()
        finally:
            writer.close()
        _, _, body = raw.partition(b"\r\n\r\n")
        return parse_metrics(body.decode())


def _daemon_config(upstream_port: int, opts: Options) -> dict[str, Any]:
    return {
        "admin": {"listen": f"{HOST}:0"},
        "log": {"level": "info", "connection_events": True},
        "shutdown": {"drain_timeout": "10s"},
        "listeners": [
            {
                "name": "soak",
                "listen": f"{HOST}:0",
                "upstreams": [f"{HOST}:{upstream_port}"],
                "buffer_size": opts.buffer_size,
                "heartbeat": {"enabled": opts.heartbeat, "interval": "1s", "max_interval": "5s"},
                "health_check": {"enabled": True, "interval": "2s", "max_interval": "5s"},
            }
        ],
    }


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("#") and (m := _SAMPLE.match(line)):
            out[m.group(1)] = float(m.group(2))
    return out


# -- sampling and the verdict ---------------------------------------------------------------------
@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    active: int
    accepted: int
    flow_paused: int
    completed: int
    mismatches: int
    errors: int

    @property
    def net_fds(self) -> int:
        """fds not explained by open connections (two sockets each)."""
        return self.fds - 2 * self.active


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def take_sample(daemon: Daemon, tally: Tally, t0: float) -> Sample:
    m = await daemon.metrics()
    fds = fd_count(daemon.pid)  # right after the scrape: `active` and fds from the same moment
    return Sample(
        t=round(time.monotonic() - t0, 1),
        rss_kib=rss_kib(daemon.pid),
        fds=fds,
        active=int(m.get('connwatch_connections_active{listener="soak"}', 0)),
        accepted=int(m.get('connwatch_connections_accepted_total{listener="soak"}', 0)),
        flow_paused=int(
            sum(v for k, v in m.items() if k.startswith("connwatch_flow_paused_total"))
        ),
        completed=sum(tally.completed.values()),
        mismatches=tally.mismatches,
        errors=sum(tally.errors.values()),
    )


COLUMNS = ("t", "rss_kib", "fds", "net_fds", "active", "accepted", "flow_paused", "completed",
           "mismatches", "errors")  # fmt: skip


def row(sample: Sample) -> str:
    return " ".join(f"{getattr(sample, c):>10}" for c in COLUMNS)


@dataclass
class Verdict:
    passed: bool
    reasons: list[str]
    figures: dict[str, float]


def judge(
    samples: list[Sample],
    window: tuple[float, float],
    tolerance: float,
    tally: Tally,
    end: dict[str, Any],
) -> Verdict:
    """PASS or FAIL with reasons. `window` is (end of warm-up, end of load) in seconds."""
    reasons: list[str] = []
    figures: dict[str, float] = {}
    after = [s for s in samples if window[0] <= s.t <= window[1] + 1]
    if len(after) < 3:
        reasons.append(f"only {len(after)} samples after the warm-up: run longer")
    else:
        third = max(1, len(after) // 3)
        last = after[-third:]
        # RSS: against the first post-warm-up sample. fds move with the connections in flight
        # at the instant of the sample, so their reference is the first third's average, with
        # two fds of slack besides the tolerance.
        checks = (
            ("rss_kib", _rss, float(after[0].rss_kib), 0),
            ("net_fds", _net_fds, sum(s.net_fds for s in after[:third]) / third, 2),
        )
        for name, value, first, slack in checks:
            avg = sum(value(s) for s in last) / len(last)
            figures[f"{name}_first"] = round(first, 1)
            figures[f"{name}_last_third_avg"] = round(avg, 1)
            if avg > first * (1 + tolerance) + slack:
                reasons.append(f"{name} grew: first {first:.1f}, last-third average {avg:.1f}")
    if tally.mismatches:
        reasons.append(f"{tally.mismatches} byte mismatches")
    if tally.errors:
        reasons.append(f"errors: {dict(tally.errors)}")
    if end["fds_after"] > end["fds_before"] + 2:
        reasons.append(f"fds after the load {end['fds_after']} > before {end['fds_before']}")
    if not tally.errors and end["bytes_c2u"] != tally.sent:
        reasons.append(f"daemon counted {end['bytes_c2u']} bytes in, clients sent {tally.sent}")
    if not tally.errors and end["bytes_u2c"] != tally.received:
        reasons.append(f"daemon counted {end['bytes_u2c']} bytes out, clients got {tally.received}")
    if end["active_after"] != 0:
        reasons.append(f"{end['active_after']} connections still open after the load")
    return Verdict(not reasons, reasons, figures)


def _rss(s: Sample) -> float:
    return s.rss_kib


def _net_fds(s: Sample) -> float:
    return s.net_fds


# -- the run --------------------------------------------------------------------------------------
@dataclass
class Options:
    minutes: float = 10.0
    sample_interval: float = 10.0
    warmup: float | None = None  # default: a fifth of the run, at most 60 s
    tolerance: float = 0.10
    churn: int = 8
    long_lived: int = 16
    stalls: int = 2
    max_conns: int = 5_000_000
    buffer_size: str = "64KiB"
    heartbeat: bool = True
    seed: int = 1
    json_path: str | None = None


async def soak(opts: Options, out: Callable[[str], None] = print) -> Verdict:
    tally = Tally()
    upstream = SoakUpstream(tally)
    upstream_port = await upstream.start()
    with tempfile.TemporaryDirectory(prefix="connwatch-soak-") as tmp:
        daemon = Daemon(Path(tmp), upstream_port, opts)
        await daemon.start()
        try:
            return await _drive(opts, tally, daemon, out)
        finally:
            await daemon.stop()
            upstream.close()


async def _drive(
    opts: Options, tally: Tally, daemon: Daemon, out: Callable[[str], None]
) -> Verdict:
    duration = opts.minutes * 60
    warmup = opts.warmup if opts.warmup is not None else min(60.0, duration / 5)
    await _settle(daemon)
    fds_before, rss_before = fd_count(daemon.pid), rss_kib(daemon.pid)
    out(f"daemon pid {daemon.pid}: {fds_before} fds, {rss_before} KiB RSS before the load; "
        f"{opts.minutes:g} min, warm-up {warmup:g} s")  # fmt: skip
    t0 = time.monotonic()
    load = Load(daemon.port, tally, t0 + duration, opts.max_conns, opts.seed)
    workers = [
        *(load.worker("churn", load.churn_once) for _ in range(opts.churn)),
        *(load.worker("long_lived", load.long_lived_once) for _ in range(opts.long_lived)),
        *(load.worker("stall", load.stall_once) for _ in range(opts.stalls)),
    ]
    tasks = [asyncio.ensure_future(w) for w in workers]
    samples: list[Sample] = []
    out(" ".join(f"{c:>10}" for c in COLUMNS))
    try:
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=opts.sample_interval)
            samples.append(await take_sample(daemon, tally, t0))
            out(row(samples[-1]))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    end = await _after_load(daemon, fds_before)
    verdict = judge(samples, (warmup, duration), opts.tolerance, tally, end)
    _report(opts, tally, daemon, samples, end, verdict, out)
    return verdict


async def _settle(daemon: Daemon) -> None:
    """Wait for the health checker's first connections to come and go."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = await daemon.metrics()
        label = _upstream_label(daemon)
        if m.get(f'connwatch_upstream_up{{listener="soak",upstream="{label}"}}'):
            break
        await asyncio.sleep(0.2)


def _upstream_label(daemon: Daemon) -> str:
    cfg = json.loads(daemon.config.read_text())
    return str(cfg["listeners"][0]["upstreams"][0])


async def _after_load(daemon: Daemon, fds_before: int) -> dict[str, Any]:
    """Wait for every connection to close, then read the end state."""
    deadline = time.monotonic() + 30
    m = await daemon.metrics()
    while m.get('connwatch_connections_active{listener="soak"}', 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        m = await daemon.metrics()
    # The fd count is judged at its lowest over a few looks: a health check may hold one briefly.
    fds_after = min([fd_count(daemon.pid)] + [await _fd_later(daemon) for _ in range(5)])
    return {
        "fds_before": fds_before,
        "fds_after": fds_after,
        "rss_after_kib": rss_kib(daemon.pid),
        "active_after": int(m.get('connwatch_connections_active{listener="soak"}', 0)),
        "bytes_c2u": int(m.get('connwatch_bytes_total{direction="client_to_upstream",listener="soak"}', 0)),
        "bytes_u2c": int(m.get('connwatch_bytes_total{direction="upstream_to_client",listener="soak"}', 0)),
        "closed": {k: v for k, v in m.items() if k.startswith("connwatch_connections_closed_total")},
    }  # fmt: skip


async def _fd_later(daemon: Daemon) -> int:
    await asyncio.sleep(0.1)
    return fd_count(daemon.pid)


def _report(
    opts: Options,
    tally: Tally,
    daemon: Daemon,
    samples: list[Sample],
    end: dict[str, Any],
    verdict: Verdict,
    out: Callable[[str], None],
) -> None:
    out(f"connections: {tally.started} started, completed {dict(tally.completed)}")
    out(f"bytes: clients sent {tally.sent}, received {tally.received}; "
        f"daemon counted {end['bytes_c2u']} in, {end['bytes_u2c']} out")  # fmt: skip
    out(
        f"closed by reason: { {k.split('reason=')[-1][1:-2]: int(v) for k, v in end['closed'].items()} }"
    )
    out(
        f"fds before {end['fds_before']}, after {end['fds_after']}; RSS after {end['rss_after_kib']} KiB"
    )
    out(f"daemon log lines by level: {dict(daemon.levels)}")
    for warning in daemon.warnings:
        out(f"  {json.dumps(warning)}")
    for line in tally.first_errors:
        out(f"  {line}")
    out(f"figures: {verdict.figures}")
    out("VERDICT: PASS" if verdict.passed else "VERDICT: FAIL: " + "; ".join(verdict.reasons))
    if opts.json_path:
        Path(opts.json_path).write_text(json.dumps({
            "options": asdict(opts), "samples": [asdict(s) for s in samples], "end": end,
            "tally": {"started": tally.started, "completed": dict(tally.completed),
                      "mismatches": tally.mismatches, "errors": dict(tally.errors),
                      "sent": tally.sent, "received": tally.received},
            "log_levels": dict(daemon.levels), "log_events": dict(daemon.events),
            "verdict": asdict(verdict),
        }, indent=1))  # fmt: skip


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="load duration (default 10)")
    p.add_argument("--sample-interval", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--warmup", type=float, default=None, help="seconds (default min(60, 20%%))")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed growth (default 0.10)")
    p.add_argument("--churn", type=int, default=8, help="concurrent churn clients")
    p.add_argument("--long-lived", type=int, default=16, help="concurrent long-lived clients")
    p.add_argument("--stalls", type=int, default=2, help="concurrent stalling readers")
    p.add_argument("--max-conns", type=int, default=5_000_000, help="connection budget")
    p.add_argument("--buffer-size", default="64KiB", help="the listener's buffer_size")
    p.add_argument("--no-heartbeat", dest="heartbeat", action="store_false", help="heartbeats off")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", dest="json_path", help="also write samples and figures here")
    return Options(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        verdict = asyncio.run(soak(opts))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            verdict = runner.run(soak(opts))
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
