"""Balancing across upstream targets, end to end through the daemon subprocess.

Each backend is a loopback echo server that names itself: a client sends a tag line, the
backend records the tag and answers with its own name, then echoes. Health-check connections
send nothing, so they never count as client connections at the backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import LOOPBACK, DaemonProcess, daemon_config, listener_config
from tests.variant import skip_under

_PER_PROCESS_BALANCER = skip_under(
    "workers2",
    "the balancer's state (round-robin position, open counts) is per worker process and the "
    "kernel spreads clients over two, so one process's exact order cannot be asserted",
)


CHECKS = {"interval": "100ms", "max_interval": "100ms", "timeout": "300ms", "rise": 1, "fall": 2}


class Backend:
    """A named echo server on loopback. `stop_listening()` refuses new connections while the
    open ones carry on; `close()` ends those too."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tags: list[str] = []
        self.open = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    async def start(self) -> Backend:
        self._server = await asyncio.start_server(self._handle, LOOPBACK, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def close(self) -> None:
        await self.stop_listening()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            tag = await reader.readuntil(b"\n")  # a health check closes before: not counted
            self.tags.append(tag.decode().strip())
            self.open += 1
            try:
                writer.write(f"{self.name}\n".encode())
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            finally:
                self.open -= 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)


@contextlib.asynccontextmanager
async def backends(*names: str) -> AsyncIterator[list[Backend]]:
    started = [await Backend(name).start() for name in names]
    try:
        yield started
    finally:
        for backend in started:
            await backend.close()


class Client:
    """One proxied connection: it sends its tag and learns which backend answered."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.backend = ""

    @classmethod
    async def open(cls, port: int, tag: str) -> Client:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        client = cls(reader, writer)
        writer.write(f"{tag}\n".encode())
        async with asyncio.timeout(10):
            try:
                client.backend = (await reader.readline()).decode().strip()  # "" if closed
            except ConnectionResetError:
                # Refused before an upstream was reached, with the tag still unread (reading
                # waits for the upstream): the kernel answers the close with a reset.
                client.backend = ""
        return client

    async def echo(self, data: bytes) -> bytes:
        self.writer.write(data)
        async with asyncio.timeout(10):
            return await self.reader.readexactly(len(data))

    async def closed_by_peer(self) -> bool:
        async with asyncio.timeout(10):
            try:
                return await self.reader.read(1) == b""
            except ConnectionResetError:
                return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def one_exchange(port: int, tag: str) -> str:
    """Open, get the backend's name, check an echo, close; returns the name ('' on failure)."""
    client = await Client.open(port, tag)
    try:
        if client.backend and await client.echo(tag.encode()) != tag.encode():
            return ""
        return client.backend
    finally:
        await client.close()


def closed_metric(listener: str, reason: str) -> str:
    return f'connwatch_connections_closed_total{{listener="{listener}",reason="{reason}"}}'


def connect_failures(listener: str, upstream: str) -> str:
    return (
        f'connwatch_upstream_connect_failures_total{{listener="{listener}",upstream="{upstream}"}}'
    )


@pytest.fixture
def refused() -> Iterator[str]:
    """A loopback port that is bound but not listening: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        yield f"{LOOPBACK}:{sock.getsockname()[1]}"


async def wait_up(daemon: DaemonProcess, listener: str, count: int) -> None:
    await daemon.wait_for("upstream_state_changed", listener=listener, new="UP", count=count)
    await workers_told(daemon)


async def workers_told(daemon: DaemonProcess) -> None:
    """With workers, the primary logs a state change and then tells each worker: a scrape, asked
    of each worker on the same ordered control channel, is answered once they all have it."""
    await daemon.metrics()


# -- round_robin ---------------------------------------------------------------------------------


@_PER_PROCESS_BALANCER
async def test_round_robin_splits_evenly_and_skips_a_down_target(tmp_path: Path) -> None:
    async with backends("a", "b") as (a, b):
        app = listener_config("app", [a.address, b.address], health_check=CHECKS)
        async with DaemonProcess(tmp_path, daemon_config(app)) as daemon:
            port = daemon.port("app")
            await wait_up(daemon, "app", 2)
            names = await asyncio.gather(*(one_exchange(port, f"rr{i}") for i in range(20)))
            assert Counter(names) == {"a": 10, "b": 10}
            assert (len(a.tags), len(b.tags)) == (10, 10)

            await b.stop_listening()
            await daemon.wait_for("upstream_state_changed", upstream=b.address, new="DOWN")
            names = await asyncio.gather(*(one_exchange(port, f"down{i}") for i in range(20)))
            assert Counter(names) == {"a": 20}  # all 20 served, none failed
            assert (len(a.tags), len(b.tags)) == (30, 10)

            await daemon.wait_for("connection_closed", listener="app", count=40)
            metrics = await daemon.metrics()
    assert metrics[closed_metric("app", "client_closed")] == 40
    assert metrics[closed_metric("app", "upstream_connect_failed")] == 0
    assert metrics[connect_failures("app", b.address)] == 0  # B was never even tried once DOWN


# -- least_connections ---------------------------------------------------------------------------


@_PER_PROCESS_BALANCER
async def test_least_connections_picks_the_emptier_target(tmp_path: Path) -> None:
    async with backends("a", "b") as (a, b):
        app = listener_config("app", [a.address, b.address], balance="least_connections")
        async with DaemonProcess(tmp_path, daemon_config(app)) as daemon:
            port = daemon.port("app")
            held = [await Client.open(port, f"held{i}") for i in range(4)]
            # Each new connection goes where fewer are open; ties go to the first target.
            assert [c.backend for c in held] == ["a", "b", "a", "b"]
            for client in held[1::2]:  # close both on B: A now holds 2, B none
                await client.close()
            await daemon.wait_for("connection_closed", listener="app", count=2)
            more = [await Client.open(port, f"more{i}") for i in range(3)]
            assert [c.backend for c in more] == ["b", "b", "a"]  # B twice to even out, then a tie
            for client in [*held[0::2], *more]:
                assert await client.echo(b"ping") == b"ping"
                await client.close()


# -- first ---------------------------------------------------------------------------------------


async def test_first_uses_the_first_usable_target(tmp_path: Path) -> None:
    async with backends("a", "b") as (a, b):
        app = listener_config("app", [a.address, b.address], balance="first", health_check=CHECKS)
        async with DaemonProcess(tmp_path, daemon_config(app)) as daemon:
            port = daemon.port("app")
            await wait_up(daemon, "app", 2)
            assert [await one_exchange(port, f"f{i}") for i in range(5)] == ["a"] * 5
            await a.stop_listening()
            await daemon.wait_for("upstream_state_changed", upstream=a.address, new="DOWN")
            await workers_told(daemon)
            assert [await one_exchange(port, f"g{i}") for i in range(5)] == ["b"] * 5
            metrics = await daemon.metrics()
    assert metrics[connect_failures("app", a.address)] == 0


# -- connect_attempts ----------------------------------------------------------------------------


async def test_connect_attempts_fall_over_to_the_next_target(tmp_path: Path, refused: str) -> None:
    """Checks off: the refusing target stays usable, so each connection tries it first."""
    async with backends("b") as (b,):
        retry = listener_config("retry", [refused, b.address], balance="first")
        once = listener_config("once", [refused, b.address], balance="first", connect_attempts=1)
        async with DaemonProcess(tmp_path, daemon_config(retry, once)) as daemon:
            names = [await one_exchange(daemon.port("retry"), f"r{i}") for i in range(5)]
            assert names == ["b"] * 5
            # No second attempt: the client is closed, with EOF, or with a reset when its tag was
            # still unread in the kernel at close (a race the load on the machine decides).
            try:
                client = await Client.open(daemon.port("once"), "once")
            except ConnectionResetError:
                pass
            else:
                assert client.backend == ""
                await client.close()
            await daemon.wait_for("connection_closed", listener="once")
            await daemon.wait_for("connection_closed", listener="retry", count=5)
            metrics = await daemon.metrics()
    assert metrics[connect_failures("retry", refused)] == 5
    assert metrics[closed_metric("retry", "client_closed")] == 5
    assert metrics[connect_failures("once", refused)] == 1
    assert metrics[closed_metric("once", "upstream_connect_failed")] == 1
    assert b.tags == [f"r{i}" for i in range(5)]


# -- nothing healthy -----------------------------------------------------------------------------


async def test_no_healthy_upstream_when_every_target_is_down(tmp_path: Path) -> None:
    async with backends("a", "b") as (a, b):
        app = listener_config("app", [a.address, b.address], health_check=CHECKS)
        async with DaemonProcess(tmp_path, daemon_config(app)) as daemon:
            await wait_up(daemon, "app", 2)
            await a.stop_listening()
            await b.stop_listening()
            await daemon.wait_for("upstream_state_changed", listener="app", new="DOWN", count=2)
            status, _ = await daemon.get("/readyz")
            assert status == 503
            client = await Client.open(daemon.port("app"), "nobody-home")
            assert client.backend == ""
            await client.close()
            line = await daemon.wait_for("connection_closed", listener="app")
            metrics = await daemon.metrics()
    assert line["reason"] == "no_healthy_upstream"
    assert line["upstream"] is None
    assert metrics[closed_metric("app", "no_healthy_upstream")] == 1
    assert metrics[connect_failures("app", a.address)] == 0


# -- on_upstream_down ----------------------------------------------------------------------------


async def test_on_upstream_down_close_closes_that_targets_connections(tmp_path: Path) -> None:
    async with backends("a") as (a,):
        closing = listener_config(
            "closing", [a.address], health_check=CHECKS, on_upstream_down="close"
        )
        keeping = listener_config("keeping", [a.address], health_check=CHECKS)
        async with DaemonProcess(tmp_path, daemon_config(closing, keeping)) as daemon:
            await wait_up(daemon, "closing", 1)
            await wait_up(daemon, "keeping", 1)
            doomed = [await Client.open(daemon.port("closing"), f"c{i}") for i in range(2)]
            kept = [await Client.open(daemon.port("keeping"), f"k{i}") for i in range(2)]
            assert {c.backend for c in [*doomed, *kept]} == {"a"}

            await a.stop_listening()  # checks now fail; open connections still work
            await daemon.wait_for("upstream_state_changed", listener="closing", new="DOWN")
            for client in doomed:
                assert await client.closed_by_peer()
            lines = [
                await daemon.wait_for("connection_closed", listener="closing", count=n)
                for n in (1, 2)
            ]
            await daemon.wait_for("upstream_state_changed", listener="keeping", new="DOWN")
            for client in kept:  # `keep` (the default) leaves them alone
                assert await client.echo(b"still here") == b"still here"
            metrics = await daemon.metrics()
            for client in [*doomed, *kept]:
                await client.close()
    assert [line["reason"] for line in lines] == ["upstream_down", "upstream_down"]
    assert metrics[closed_metric("closing", "upstream_down")] == 2
    assert metrics[closed_metric("keeping", "upstream_down")] == 0


@_PER_PROCESS_BALANCER
async def test_least_connections_spreads_a_burst(tmp_path: Path) -> None:
    """Connections still connecting count too: a burst must not all pick the same target."""
    async with backends("a", "b") as (a, b):
        app = listener_config("app", [a.address, b.address], balance="least_connections")
        async with DaemonProcess(tmp_path, daemon_config(app)) as daemon:
            clients = await asyncio.gather(
                *(Client.open(daemon.port("app"), f"burst{i}") for i in range(20))
            )
            split = Counter(c.backend for c in clients)
            for client in clients:
                await client.close()
    assert split == {"a": 10, "b": 10}
