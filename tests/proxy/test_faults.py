"""Fault injection, end to end: the daemon subprocess on loopback while a peer misbehaves.

Each fault runs next to a batch of byte-exact exchanges on a second listener (tests/payload.py):
a fault on one connection must cost nothing to the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.nft import nft_table
from tests.payload import PayloadUpstream, exchange
from tests.support import (
    LOOPBACK,
    DaemonProcess,
    EchoUpstream,
    daemon_config,
    eventually,
    free_port,
    listener_config,
    reset,
)
from tests.variant import VARIANT, skip_under

KiB, MiB = 1024, 1024 * 1024
PROMPT = 2.0  # seconds within which a fault must reach the client


# -- helpers --------------------------------------------------------------------------------------
def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slots_used(pid: int) -> int:
    """Fds numbered below FD_LIMIT: RLIMIT_NOFILE caps fd numbers, and a process may inherit
    a high-numbered fd from the test runner that takes no slot."""
    return sum(1 for fd in os.listdir(f"/proc/{pid}/fd") if int(fd) < FD_LIMIT)


def _open_sockets(pid: int) -> set[str]:
    """The `socket:[inode]` targets of a process's fds."""
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return {t for t in targets if t.startswith("socket:")}


async def admin_filler(daemon: DaemonProcess, pid: int) -> socket.socket:
    """An idle admin connection, returned once the daemon has accepted it (a new socket in its
    table: counting fds would not do, the daemon may close one of its own meanwhile, e.g. the
    acceptor handing accepting from the loop's server back to its own loop)."""
    before = _open_sockets(pid)
    sock = socket.create_connection((LOOPBACK, daemon.admin_port))
    try:
        await eventually(lambda: _open_sockets(pid) - before, timeout=5)
    except BaseException:
        sock.close()
        raise
    return sock


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def pid_of(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    return daemon.proc.pid


async def good_traffic(port: int, upstream: PayloadUpstream, count: int, seed: int) -> None:
    """`count` concurrent exchanges through `port`; every byte must arrive, both ways."""
    rng = random.Random(seed)
    base = seed * 1000
    sizes = [(rng.randrange(0, 2 * MiB), rng.randrange(0, 2 * MiB)) for _ in range(count)]
    results = await asyncio.gather(
        *(exchange(port, base + i, s, r) for i, (s, r) in enumerate(sizes))
    )
    for res, (_, reply_len) in zip(results, sizes, strict=True):
        assert res.reply_ok, f"exchange {res.nonce}: reply corrupted ({res})"
        assert res.reply_len == reply_len
        got = upstream.received[res.nonce]
        assert (got.nbytes, got.digest) == (res.sent, res.sent_digest), f"exchange {res.nonce}"


def two_listeners(faulty: str, good: str, **faulty_overrides: Any) -> dict[str, Any]:
    return daemon_config(
        listener_config("faulty", [faulty], **faulty_overrides),
        listener_config("good", [good]),
    )


class Transfer:
    """A client that writes and reads as fast as it can until its connection ends."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received = 0
        self.sent = 0
        self.outcome: str | None = None  # "eof" or the exception's name
        self.ended_at = 0.0
        self.writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Transfer:
        reader, self.writer = await asyncio.open_connection(LOOPBACK, self.port)
        self._task = asyncio.ensure_future(self._run(reader, self.writer))
        return self

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender = asyncio.ensure_future(self._send(writer))
        try:
            while data := await reader.read(64 * KiB):
                self.received += len(data)
            self.outcome = "eof"
        except OSError as exc:
            self.outcome = type(exc).__name__
        finally:
            self.ended_at = time.monotonic()
            sender.cancel()
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter) -> None:
        chunk = b"c" * (64 * KiB)
        with contextlib.suppress(OSError):
            while True:
                writer.write(chunk)
                await writer.drain()
                self.sent += len(chunk)

    async def moved(self, nbytes: int) -> None:
        await eventually(lambda: self.received >= nbytes and self.sent >= nbytes, timeout=10)

    async def ended(self, timeout: float) -> None:
        assert self._task is not None
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._task)

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0), as a crashing client would."""
        assert self.writer is not None
        reset(self.writer)


# -- upstream faults ------------------------------------------------------------------------------
_KILLABLE_UPSTREAM = """
import asyncio

async def handle(reader, writer):
    async def pump():
        while True:
            writer.write(b"u" * 65536)
            await writer.drain()
    task = asyncio.ensure_future(pump())
    while await reader.read(65536):
        pass
    task.cancel()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def killable_upstream() -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLABLE_UPSTREAM, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            port = int(await proc.stdout.readline())
        yield proc, f"{LOOPBACK}:{port}"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_upstream_killed_mid_transfer_closes_the_client_promptly_and_spares_other_traffic(
    tmp_path: Path,
) -> None:
    async with (
        killable_upstream() as (proc, address),
        PayloadUpstream() as good,
        DaemonProcess(tmp_path, two_listeners(address, good.address)) as daemon,
    ):
        victim = await Transfer(daemon.port("faulty")).start()
        await victim.moved(1 * MiB)
        traffic = asyncio.ensure_future(good_traffic(daemon.port("good"), good, 20, seed=1))
        proc.kill()  # SIGKILL: the kernel closes its sockets (RST where data was unread)
        killed = time.monotonic()
        await victim.ended(timeout=5)
        assert victim.ended_at - killed < PROMPT, (
            f"client leg closed after {victim.ended_at - killed:.2f}s"
        )
        assert victim.outcome in {"eof", "ConnectionResetError"}
        closed = await daemon.wait_for("connection_closed", listener="faulty")
        assert closed["reason"] in {"upstream_reset", "upstream_closed"}
        await traffic
        await daemon.wait_for("connection_closed", listener="good", count=20, timeout=30)
        assert {line["reason"] for line in daemon.find("connection_closed", listener="good")} == {
            "client_closed"
        }


async def test_upstream_reset_mid_transfer_resets_the_client_promptly_as_upstream_reset(
    tmp_path: Path,
) -> None:
    async with (
        EchoUpstream(stream=0) as upstream,
        PayloadUpstream() as good,
        DaemonProcess(tmp_path, two_listeners(upstream.address, good.address)) as daemon,
    ):
        victim = await Transfer(daemon.port("faulty")).start()
        await victim.moved(1 * MiB)
        traffic = asyncio.ensure_future(good_traffic(daemon.port("good"), good, 20, seed=2))
        upstream.reset_all()
        reset = time.monotonic()
        await victim.ended(timeout=5)
        assert victim.ended_at - reset < PROMPT
        # The daemon passes the reset on (SO_LINGER 0 on the client leg).
        assert victim.outcome == "ConnectionResetError"
        closed = await daemon.wait_for("connection_closed", listener="faulty")
        assert closed["reason"] == "upstream_reset"
        await traffic
        m = await daemon.metrics()
        assert m['connwatch_connections_closed_total{listener="good",reason="client_closed"}'] == 20
        assert m['connwatch_connections_active{listener="good"}'] == 0


async def test_upstream_that_never_reads_back_pressures_the_client(tmp_path: Path) -> None:
    async with (
        EchoUpstream(stream=0, read=False, rcvbuf=64 * KiB) as upstream,
        PayloadUpstream() as good,
        DaemonProcess(
            tmp_path, two_listeners(upstream.address, good.address, buffer_size="64KiB")
        ) as daemon,
    ):
        pid = pid_of(daemon)
        before = rss_kib(pid)
        reader, writer = await asyncio.open_connection(LOOPBACK, daemon.port("faulty"))
        await upstream.connected.wait()
        sent = await _write_until_blocked(writer, limit=256 * MiB)
        # Kernel buffers on four sockets plus one buffer_size in the daemon; never the lot.
        assert sent < 48 * MiB, f"{sent} bytes accepted by an upstream that reads nothing"

        async def paused() -> bool:
            m = await daemon.metrics()
            key = 'connwatch_flow_paused_total{direction="client_to_upstream",listener="faulty"}'
            return m[key] > 0

        await eventually(paused, timeout=5)
        await good_traffic(daemon.port("good"), good, 20, seed=3)  # unaffected meanwhile
        grown = rss_kib(pid) - before
        assert grown < 24 * 1024, f"daemon RSS grew by {grown} KiB while the upstream stalled"
        # The stuck connection is still open and still paused; the upstream now gives up.
        assert len(await daemon.connections("?listener=faulty")) == 1
        upstream.reset_all()
        closed = await daemon.wait_for("connection_closed", listener="faulty")
        assert closed["reason"] == "upstream_reset"
        assert closed["bytes_client_to_upstream"] <= sent
        writer.close()
        with contextlib.suppress(OSError):
            await reader.read()


async def _write_until_blocked(writer: asyncio.StreamWriter, limit: int) -> int:
    """Write until a drain has waited a full second (back-pressure) or `limit` bytes went."""
    chunk = b"w" * (256 * KiB)
    sent = 0
    while sent < limit:
        writer.write(chunk)
        try:
            async with asyncio.timeout(1.0):
                await writer.drain()
        except TimeoutError:
            return sent + len(chunk)
        sent += len(chunk)
    return sent


# -- connect blackholed with nftables -------------------------------------------------------------
def _nft_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root for nftables"
    if shutil.which("nft") is None:
        return "needs the nft command"
    return None


@contextlib.asynccontextmanager
async def syn_blackhole(port: int) -> AsyncIterator[str]:
    """Drop SYNs to `port` on lo (table `inet cw_faults_<pid>`, deleted on exit)."""
    rule = f"iif lo tcp dport {port} tcp flags & (syn | ack) == syn drop"
    async with nft_table(f"cw_faults_{os.getpid()}", [rule]) as table:
        yield table


async def _table_exists(table: str) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "nft", "list", "table", "inet", table, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return await proc.wait() == 0


@pytest.mark.root
@pytest.mark.skipif(_nft_missing() is not None, reason=_nft_missing() or "")
async def test_upstream_that_never_answers_connect_closes_the_client_at_connect_timeout(
    tmp_path: Path,
) -> None:
    port = free_port()
    async with PayloadUpstream() as good:
        cfg = two_listeners(
            f"{LOOPBACK}:{port}", good.address, connect_timeout="1s", connect_attempts=1
        )
        async with DaemonProcess(tmp_path, cfg) as daemon, syn_blackhole(port) as table:
            traffic = asyncio.ensure_future(good_traffic(daemon.port("good"), good, 10, seed=4))
            started = time.monotonic()
            reader, writer = await asyncio.open_connection(LOOPBACK, daemon.port("faulty"))
            writer.write(b"hello")
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            took = time.monotonic() - started
            writer.close()
            assert took < 1 + 1, f"client closed after {took:.2f}s (connect_timeout 1s)"
            closed = await daemon.wait_for("connection_closed", listener="faulty")
            assert closed["reason"] == "upstream_connect_failed"
            assert closed["duration_s"] >= 0.9  # it did wait for the timeout: SYNs were dropped
            await traffic
        assert not await _table_exists(table)


@pytest.mark.root
@pytest.mark.skipif(_nft_missing() is not None, reason=_nft_missing() or "")
async def test_client_bytes_before_the_upstream_connects_are_held_bounded(tmp_path: Path) -> None:
    """A client that writes while its upstream connect hangs is back-pressured: connwatch holds
    at most a read or two for it (uvloop reads an accepted socket once despite a pause made in
    connection_made; without a second pause it read all 64 MiB into memory)."""
    port = free_port()
    async with PayloadUpstream() as good:
        cfg = two_listeners(
            f"{LOOPBACK}:{port}", good.address, connect_timeout="3s", connect_attempts=1
        )
        async with DaemonProcess(tmp_path, cfg) as daemon, syn_blackhole(port):
            pid = pid_of(daemon)
            before = rss_kib(pid)
            _reader, writer = await asyncio.open_connection(LOOPBACK, daemon.port("faulty"))
            sent = await _write_until_blocked(writer, limit=64 * MiB)
            grown = rss_kib(pid) - before
            assert sent < 48 * MiB, f"{sent} bytes accepted while the upstream connect hung"
            assert grown < 16 * 1024, f"daemon RSS grew by {grown} KiB while the connect hung"
            await good_traffic(daemon.port("good"), good, 5, seed=6)  # unaffected meanwhile
            reset(writer)
            # Not read while paused, the reset is seen only when the connect gives up.
            closed = await daemon.wait_for("connection_closed", listener="faulty")
            assert closed["reason"] == "upstream_connect_failed"
            held = closed["bytes_client_to_upstream"]  # read from the client, never forwarded
            assert held <= 1 * MiB, f"{held} bytes held of {sent} sent before the upstream was up"


# -- client faults --------------------------------------------------------------------------------
async def test_client_reset_mid_transfer_closes_the_upstream_leg_as_client_reset(
    tmp_path: Path,
) -> None:
    async with (
        EchoUpstream(stream=0) as upstream,
        PayloadUpstream() as good,
        DaemonProcess(tmp_path, two_listeners(upstream.address, good.address)) as daemon,
    ):
        victim = await Transfer(daemon.port("faulty")).start()
        await victim.moved(1 * MiB)
        traffic = asyncio.ensure_future(good_traffic(daemon.port("good"), good, 20, seed=5))
        victim.reset()
        reset = time.monotonic()
        async with asyncio.timeout(PROMPT):
            await upstream.ended.wait()  # the upstream's leg is closed too
        assert time.monotonic() - reset < PROMPT
        closed = await daemon.wait_for("connection_closed", listener="faulty")
        assert closed["reason"] == "client_reset"
        await traffic


# -- fd exhaustion --------------------------------------------------------------------------------
FD_LIMIT = 64


class LimitedDaemon(DaemonProcess):
    """The daemon under `prlimit --nofile=N:N` (prlimit execs it: the PID is the daemon's)."""

    def __init__(self, tmp_path: Path, config: dict[str, Any], nofile: int) -> None:
        super().__init__(tmp_path, config, wrapper=["prlimit", f"--nofile={nofile}:{nofile}"])


class EchoClient:
    """One proxied connection that proves itself byte-exact on demand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.seq = 0

    @classmethod
    async def open(cls, port: int) -> EchoClient:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        client = cls(reader, writer)
        await client.roundtrip()
        return client

    async def roundtrip(self) -> None:
        self.seq += 1
        payload = os.urandom(1024 + self.seq)
        self.writer.write(payload)
        async with asyncio.timeout(5):
            assert await self.reader.readexactly(len(payload)) == payload

    def close(self) -> None:
        self.writer.close()


async def _attempt(port: int) -> str:
    """One new client: 'served' if its bytes came back, else how it was turned away."""
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                writer.write(b"are you there")
                data = await reader.read(100)
            finally:
                writer.close()
    except TimeoutError:
        return "hung"
    except OSError as exc:
        return type(exc).__name__
    return "served" if data == b"are you there" else "closed"


@contextlib.asynccontextmanager
async def exhausted(tmp_path: Path) -> AsyncIterator[tuple[LimitedDaemon, list[EchoClient], Any]]:
    """A daemon with every fd in use: proxied connections, then idle admin sockets for the rest.

    Yields the daemon, the open proxied connections and a `release()` coroutine that frees them.
    """
    async with EchoUpstream() as upstream:
        cfg = daemon_config(listener_config("app", [upstream.address]))
        async with LimitedDaemon(tmp_path, cfg, FD_LIMIT) as daemon:
            pid = pid_of(daemon)
            clients = [
                await EchoClient.open(daemon.port("app"))
                for _ in range((FD_LIMIT - slots_used(pid) - 4) // 2)
            ]
            fillers: list[socket.socket] = []

            async def release() -> None:
                for sock in fillers:
                    sock.close()
                for client in clients[: len(clients) // 2]:
                    client.close()
                await eventually(lambda: slots_used(pid) < FD_LIMIT - 8, timeout=10)

            try:
                while slots_used(pid) < FD_LIMIT:  # one fd each on the admin side
                    fillers.append(await admin_filler(daemon, pid))
                yield daemon, clients, release
            finally:
                for sock in fillers:
                    sock.close()
                for client in clients:
                    client.close()


def _closed_series(reason: str) -> str:
    return f'connwatch_connections_closed_total{{listener="app",reason="{reason}"}}'


_NO_PRLIMIT = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")

_FDS_OF_ONE_PROCESS = skip_under(
    "workers2",
    "the test fills one process's descriptor table (prlimit, /proc/PID/fd of the primary), "
    "while with workers the client connections are in the workers' own tables",
)


@_NO_PRLIMIT
@_FDS_OF_ONE_PROCESS
async def test_fd_exhaustion_fails_new_clients_cleanly_and_recovers(tmp_path: Path) -> None:
    async with exhausted(tmp_path) as (daemon, clients, release):
        port = daemon.port("app")
        outcomes = await asyncio.gather(*(_attempt(port) for _ in range(30)))
        assert "hung" not in outcomes, outcomes
        assert "served" not in outcomes, outcomes
        for client in clients:  # the existing connections never noticed
            await client.roundtrip()
        await release()
        closed = (await daemon.metrics()).get  # the admin endpoint had no fd either until now
        turned_away = closed(_closed_series("error"), 0) + closed(
            _closed_series("upstream_connect_failed"), 0
        )
        assert turned_away == 30  # every refused client is counted
        assert [await _attempt(port) for _ in range(5)] == ["served"] * 5
        for client in clients[len(clients) // 2 :]:
            await client.roundtrip()
        assert daemon.proc is not None
        assert daemon.proc.returncode is None


def _fd_exhaustion_lines(daemon: DaemonProcess, *, accept_only: bool = False) -> list[str]:
    """Warning/error lines about running out of fds (with accept_only: not about upstreams)."""
    lines = [line for line in daemon.lines if line.get("level") in ("warning", "error")]
    if accept_only:
        lines = [line for line in lines if line.get("event") != "upstream_connect_failed"]
    text = [json.dumps(line) for line in lines]
    return [t for t in text if "Too many open files" in t or "EMFILE" in t or "accept" in t]


@_NO_PRLIMIT
async def test_fd_exhaustion_at_accept_is_logged_once_per_burst(tmp_path: Path) -> None:
    async with exhausted(tmp_path) as (daemon, _clients, release):
        port = daemon.port("app")
        for _ in range(3):  # three bursts of 10, a second apart
            await asyncio.gather(*(_attempt(port) for _ in range(10)))
            await asyncio.sleep(1.0)
        await release()
        assert await _attempt(port) == "served"
        lines = _fd_exhaustion_lines(daemon, accept_only=True)
        assert 1 <= len(lines) <= 3, f"{len(lines)} log lines for 3 bursts of 10: {lines[:3]}"


@_NO_PRLIMIT
@skip_under(
    "splice",
    "the pipe pool's idle pipes are freed on EMFILE and the upstream socket() retried "
    "(docs/data-paths.md, Out of descriptors), so 'exactly one fd left' cannot be arranged "
    "from outside: those clients are served",
)
@_FDS_OF_ONE_PROCESS
async def test_fd_exhaustion_at_upstream_connect_is_not_logged_per_attempt(tmp_path: Path) -> None:
    async with EchoUpstream() as upstream:
        cfg = daemon_config(listener_config("app", [upstream.address]))
        async with LimitedDaemon(tmp_path, cfg, FD_LIMIT) as daemon:
            pid = pid_of(daemon)
            port = daemon.port("app")
            # Leave exactly one fd: each new client is accepted, its upstream socket() fails.
            clients: list[EchoClient] = []
            fillers: list[socket.socket] = []
            try:
                while slots_used(pid) < FD_LIMIT - 2:
                    clients.append(await EchoClient.open(port))
                while slots_used(pid) < FD_LIMIT - 1:  # one fd on the admin side
                    fillers.append(await admin_filler(daemon, pid))
                assert slots_used(pid) == FD_LIMIT - 1
                outcomes = [await _attempt(port) for _ in range(30)]
                assert "served" not in outcomes, outcomes
                assert "hung" not in outcomes, outcomes
                for client in clients:
                    await client.roundtrip()
                m = await daemon.metrics()
                assert m[_closed_series("upstream_connect_failed")] == 30  # counted, one by one
            finally:
                for client in clients:
                    client.close()
                for sock in fillers:
                    sock.close()
            lines = _fd_exhaustion_lines(daemon)
            assert 1 <= len(lines) <= 3, f"{len(lines)} warning lines for 30 refused clients"


# -- SIGHUP storm ---------------------------------------------------------------------------------
class EchoSession:
    """A long-lived echo connection exchanging a message whenever asked."""

    def __init__(self, port: int, nonce: int) -> None:
        self.port = port
        self.rng = random.Random(nonce)
        self.exchanged = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
        try:
            while not self._stop.is_set():
                payload = self.rng.randbytes(self.rng.randrange(1, 64 * KiB))
                writer.write(payload)
                async with asyncio.timeout(10):
                    assert await reader.readexactly(len(payload)) == payload
                self.exchanged += 1
                await asyncio.sleep(0.01)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()

    async def finish(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def test_sighup_storm_cuts_no_connection_and_leaks_nothing(tmp_path: Path) -> None:
    async with EchoUpstream() as echo, PayloadUpstream() as payload:
        app = listener_config("app", [payload.address])
        base = daemon_config(app, listener_config("echo", [echo.address]))
        # The second config changes the listeners' settings and adds a listener.
        other = daemon_config(
            {**app, "buffer_size": "64KiB", "idle_timeout": "1h"},
            listener_config("echo", [echo.address], max_connections=5000),
            listener_config("extra", [echo.address]),
        )
        async with DaemonProcess(tmp_path, base) as daemon:
            pid = pid_of(daemon)
            fds_before = fd_count(pid)
            sessions = [EchoSession(daemon.port("echo"), n) for n in range(8)]
            for session in sessions:
                session.start()
            batches = 0
            storm_over = asyncio.Event()

            async def traffic() -> None:
                nonlocal batches
                while not storm_over.is_set() and batches < 100:
                    await good_traffic(daemon.port("app"), payload, 10, seed=100 + batches)
                    batches += 1

            load = asyncio.ensure_future(traffic())
            for i in range(1, 51):
                daemon.write_config(other if i % 2 else base)
                daemon.signal(signal.SIGHUP)
                await daemon.wait_for("config_reloaded", count=i, timeout=10)
            storm_over.set()
            await load
            for session in sessions:
                await session.finish()
                assert session.exchanged > 0
            assert batches >= 1
            await eventually(lambda: daemon.find("connection_closed") and _all_closed(daemon))
            m = await daemon.metrics()
            assert m['connwatch_config_reloads_total{result="success"}'] == 50
            assert m.get('connwatch_config_reloads_total{result="failure"}', 0) == 0
            reasons = {line["reason"] for line in daemon.find("connection_closed")}
            assert reasons == {"client_closed"}, reasons
            assert not daemon.find("config_reload_failed")
            # On splice, pooled pipes close once none was taken for a 5 s period: up to 10 s; and
            # the loop's one epoll set for spliced sockets (splice/poller.py), made at the first
            # spliced connection, stays for the process's life.
            fds_after = fds_before + (1 if VARIANT == "splice" else 0)
            await eventually(lambda: fd_count(pid) <= fds_after, timeout=10 + 10)


def _all_closed(daemon: DaemonProcess) -> bool:
    return len(daemon.find("connection_opened")) == len(daemon.find("connection_closed"))


# -- a slow reader of an upstream that has finished -----------------------------------------------
# Found by bench/soak.py: the upstream leg's socket is in TCP_CLOSE once FINs went both ways,
# while its last bytes still wait behind paused reading. The watchdog must not call that dead.
@pytest.mark.parametrize(
    "heartbeat", [pytest.param(True, id="heartbeat_on"), pytest.param(False, id="heartbeat_off")]
)
async def test_slow_reader_of_a_finished_upstream_gets_every_byte(
    tmp_path: Path, heartbeat: bool
) -> None:
    from connwatch.liveness.tcp_info import read_tcp_info

    chunk = 16 * KiB
    reply = bytearray()
    finished = asyncio.Event()

    async def paused() -> bool:
        m = await daemon.metrics()
        key = 'connwatch_flow_paused_total{direction="upstream_to_client",listener="app"}'
        return m[key] > 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.read() == b"question"  # the client's EOF arrives: we are half-closed
        # Send until the daemon pauses (the client reads nothing), then a little more, which
        # the daemon's kernel takes but the daemon does not read; then our FIN behind it.
        for _ in range(4096):
            if await paused():
                break
            data = os.urandom(chunk)
            reply.extend(data)
            writer.write(data)
            await writer.drain()
        extra = os.urandom(chunk)
        reply.extend(extra)
        writer.write(extra)
        await writer.drain()
        sock = writer.transport.get_extra_info("socket")

        def all_acked() -> bool:
            info = read_tcp_info(sock)
            return info is not None and info.unacked == 0 and not info.notsent_bytes

        await eventually(all_acked, timeout=5)
        writer.write_eof()
        finished.set()
        with contextlib.suppress(OSError):
            await reader.read()
        writer.close()

    server = await asyncio.start_server(upstream, LOOPBACK, 0)
    address = f"{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
    beats = {
        "enabled": heartbeat,
        "interval": "300ms",
        "max_interval": "300ms",
        "failure_threshold": 3,
    }
    cfg = daemon_config(listener_config("app", [address], buffer_size="64KiB", heartbeat=beats))
    daemon = DaemonProcess(tmp_path, cfg)
    async with server, daemon:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)  # fills early
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, (LOOPBACK, daemon.port("app")))
        reader, writer = await asyncio.open_connection(sock=client)
        writer.write(b"question")
        writer.write_eof()
        await asyncio.wait_for(finished.wait(), 30)

        async def judged() -> bool:
            """Several beats have looked at the connection since the FIN (or it is gone)."""
            m = await daemon.metrics()
            done = sum(v for k, v in m.items() if k.startswith("connwatch_heartbeats_total"))
            return done >= start + 5 or bool(daemon.find("connection_closed"))

        m = await daemon.metrics()
        start = sum(v for k, v in m.items() if k.startswith("connwatch_heartbeats_total"))
        if heartbeat:
            await eventually(judged, timeout=10)
        got = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while data := await asyncio.wait_for(reader.read(256 * KiB), 10):
                got.extend(data)
        writer.close()
        closed = await daemon.wait_for("connection_closed")
        assert len(got) == len(reply), f"client got {len(got)} of {len(reply)} bytes: {closed}"
        assert got == reply
        assert closed["reason"] in {"client_closed", "upstream_closed"}


# -- hostile clients: PROXY headers and heartbeat frames ------------------------------------------
def proxy_listener(upstream: str) -> dict[str, Any]:
    return listener_config(
        "app", [upstream], connect_timeout="1s", proxy_protocol={"accept": True, "send": "none"}
    )


async def test_proxy_header_trickle_is_cut_at_connect_timeout(tmp_path: Path) -> None:
    """With `accept` on, a slowloris on the PROXY header ends at connect_timeout."""
    async with EchoUpstream() as upstream:
        cfg = daemon_config(proxy_listener(upstream.address))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            reader, writer = await asyncio.open_connection(LOOPBACK, daemon.port("app"))
            started = time.monotonic()
            header = b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000\r\n"
            ended = None
            for i in range(len(header) - 2):  # never the final CRLF
                writer.write(header[i : i + 1])
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        with contextlib.suppress(ConnectionResetError):
                            await reader.read(1)
                        ended = time.monotonic() - started
                        break
            writer.close()
            assert ended is not None, "a trickled PROXY header kept the connection open"
            assert ended < 1 + 1
            closed = await daemon.wait_for("connection_closed")
            assert closed["reason"] == "protocol_error"
            assert upstream.accepted == 0  # no upstream connection was spent on it


async def _garbage_clients(port: int, payload: bytes, count: int) -> None:
    """`count` clients, 20 at a time, each sending `payload` and waiting to be closed."""

    async def one() -> None:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(payload)
        with contextlib.suppress(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()

    for _ in range(count // 20):
        await asyncio.gather(*(one() for _ in range(20)))


async def test_bad_proxy_headers_are_each_counted(tmp_path: Path) -> None:
    async with EchoUpstream() as upstream:
        cfg = daemon_config(proxy_listener(upstream.address))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            await _garbage_clients(daemon.port("app"), b"GET / HTTP/1.1\r\n\r\n", 200)
            await daemon.wait_for("connection_closed", count=200)
            m = await daemon.metrics()
            assert m['connwatch_protocol_errors_total{kind="proxy_protocol"}'] == 200
            closed = 'connwatch_connections_closed_total{listener="app",reason="protocol_error"}'
            assert m[closed] == 200
            assert upstream.accepted == 0


def _warnings(daemon: DaemonProcess, event: str) -> list[dict[str, Any]]:
    return [line for line in daemon.lines if line.get("event") == event]


async def test_bad_proxy_headers_do_not_flood_the_log(tmp_path: Path) -> None:
    async with EchoUpstream() as upstream:
        cfg = daemon_config(proxy_listener(upstream.address), log={"level": "info"})
        async with DaemonProcess(tmp_path, cfg) as daemon:
            await _garbage_clients(daemon.port("app"), b"GET / HTTP/1.1\r\n\r\n", 200)
            await daemon.wait_for("connection_closed", count=200)
            lines = _warnings(daemon, "protocol_error")
            assert 1 <= len(lines) <= 5, f"{len(lines)} protocol_error lines for 200 bad headers"


async def test_bad_heartbeat_frames_do_not_flood_the_log(tmp_path: Path) -> None:
    async with EchoUpstream() as upstream:
        cfg = daemon_config(listener_config("app", [upstream.address]), log={"level": "info"})
        cfg["admin"]["heartbeat_listen"] = f"{LOOPBACK}:0"
        async with DaemonProcess(tmp_path, cfg) as daemon:
            started = await daemon.wait_for("heartbeat_responder_started")
            await _garbage_clients(int(started["port"]), b"\x00" * 16, 200)

            async def counted() -> bool:
                m = await daemon.metrics()
                return m.get('connwatch_protocol_errors_total{kind="heartbeat_frame"}') == 200

            await eventually(counted, timeout=10)
            lines = _warnings(daemon, "protocol_error")
            assert 1 <= len(lines) <= 5, f"{len(lines)} protocol_error lines for 200 bad frames"
