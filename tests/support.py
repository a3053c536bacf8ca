"""Test helpers: real upstream servers on loopback, the daemon in-process or as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import yaml

from tests.variant import with_variant

LOOPBACK = "127.0.0.1"
UPSTREAM_CHUNK = 4096


# -- upstream servers -----------------------------------------------------------------------------
def reset(writer: asyncio.StreamWriter) -> None:
    """Close a stream with a RST (SO_LINGER 0), as a crashing peer would; a socket that has
    already closed is only aborted."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class EchoUpstream:
    """The one test upstream: a loopback (or unix) server that echoes.

    By default it echoes every byte and answers EOF with EOF. With `greet_only` it echoes just the
    first chunk (the greeting), then streams `u` chunks if `stream` is set (seconds between chunks,
    0 for as fast as the daemon takes them, at most `chunks` of them), then reads until EOF, and
    with `hold_open` keeps its side open until `closing` is set. Without `greet_only`, `stream`
    makes it stream from the start while it reads and drops what comes (no echo), or, with
    `read=False`, never reads. Greet-only and streaming legs never close first, so they
    are aborted at exit. `rcvbuf` sets SO_RCVBUF on the listening socket (accepted legs inherit
    it). `connected` is set when a leg is accepted; `blocked` when a write had to queue (the daemon
    stopped reading us); `ended` when a leg ends (EOF, reset or write failure). `reset_all()`
    resets every leg.
    """

    def __init__(
        self,
        *,
        greet_only: bool = False,
        stream: float | None = None,
        chunks: int = 1_000_000,  # bounded: far past any test's end
        hold_open: bool = False,
        unix_path: Path | None = None,
        read: bool = True,
        rcvbuf: int | None = None,
    ) -> None:
        self.greet_only = greet_only
        self.stream = stream
        self.chunks = chunks
        self.hold_open = hold_open
        self.unix_path = unix_path
        self.read = read
        self.rcvbuf = rcvbuf
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.connected = asyncio.Event()
        self.blocked = asyncio.Event()
        self.ended = asyncio.Event()
        self.closing = asyncio.Event()
        self.accepted = 0
        self.open = 0
        self.received = 0

    async def __aenter__(self) -> EchoUpstream:
        if self.unix_path is not None:
            self.server = await asyncio.start_unix_server(self._handle, str(self.unix_path))
        elif self.rcvbuf is not None:
            self.server = await asyncio.start_server(self._handle, sock=self._small_rcvbuf_socket())
        else:
            self.server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        return self

    def _small_rcvbuf_socket(self) -> socket.socket:
        """A bound listening socket whose SO_RCVBUF its accepted legs inherit."""
        assert self.rcvbuf is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind((LOOPBACK, 0))
        return sock

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        self.closing.set()
        if self.greet_only or self.stream is not None:
            for writer in self.writers:  # legs whose close never reached us (dropped, held)
                writer.transport.abort()
            await eventually(lambda: self.open == 0, timeout=5)
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"{LOOPBACK}:{self.port}"

    def reset_all(self) -> None:
        """Close every leg with a RST (SO_LINGER 0)."""
        for writer in self.writers:
            reset(writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.writers.append(writer)
        self.connected.set()
        try:
            if self.greet_only:
                await self._greet(reader, writer)
            elif self.stream is not None:
                await self._flood(reader, writer, self.stream)
            else:
                await self._echo(reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            self.ended.set()
            writer.close()
            self.open -= 1

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.received += len(data)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()

    async def _greet(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        greeting = await reader.read(UPSTREAM_CHUNK)
        self.received += len(greeting)
        writer.write(greeting)
        await writer.drain()
        if self.stream is not None:
            await self._send(writer, self.stream)
        while data := await reader.read(UPSTREAM_CHUNK):
            self.received += len(data)
        if self.hold_open:
            await self.closing.wait()  # hold our side open after the client's EOF

    async def _flood(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, interval: float
    ) -> None:
        """Stream to the leg from the start while reading (and dropping) what it sends."""
        pump = asyncio.ensure_future(self._pump(writer, interval))
        try:
            if not self.read:
                await self.closing.wait()  # accepts, never reads; released at exit
                return
            while data := await reader.read(65536):
                self.received += len(data)
        finally:
            pump.cancel()

    async def _pump(self, writer: asyncio.StreamWriter, interval: float) -> None:
        with contextlib.suppress(OSError):  # the leg was reset or closed under us
            await self._send(writer, interval)

    async def _send(self, writer: asyncio.StreamWriter, interval: float) -> None:
        for _ in range(self.chunks):
            if writer.transport.is_closing():  # aborted by reset_all() or at exit
                return
            writer.write(b"u" * UPSTREAM_CHUNK)
            if writer.transport.get_write_buffer_size():
                self.blocked.set()
            # Blocks while the daemon has paused reading us; raises once it has closed our leg.
            await writer.drain()
            await asyncio.sleep(interval)


def free_port() -> int:
    """A port that was free a moment ago (only for addresses a test must know before binding)."""
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def listener_config(name: str, upstreams: list[str], **overrides: Any) -> dict[str, Any]:
    """A listener on an ephemeral loopback port, health checks off unless asked for."""
    cfg: dict[str, Any] = {
        "name": name,
        "listen": f"{LOOPBACK}:0",
        "upstreams": upstreams,
        "health_check": {"enabled": False},
        "heartbeat": {"enabled": False},
    }
    cfg.update(overrides)
    return cfg


def daemon_config(*listeners: dict[str, Any], **top: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "admin": {"listen": f"{LOOPBACK}:0"},
        "log": {"level": "debug"},
        "shutdown": {"drain_timeout": "5s"},
        "listeners": list(listeners),
    }
    cfg.update(top)
    return cfg


# -- the daemon in this process -------------------------------------------------------------------
@contextlib.asynccontextmanager
async def running_daemon(config: dict[str, Any]) -> AsyncIterator[Any]:
    """Start a Daemon in the running loop (no signal handlers); shut it down afterwards."""
    from connwatch.config import load_settings
    from connwatch.observe.logs import configure_logging
    from connwatch.runtime.daemon import Daemon

    config = with_variant(config, in_process=True)
    settings = load_settings(None, base=config, env={})
    configure_logging("warning", "json")
    daemon = Daemon(settings, base_config=config)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.shutdown()


# -- the daemon as a subprocess -------------------------------------------------------------------
class DaemonProcess:
    """`python -m connwatch run -c FILE` with its JSON log lines collected as they arrive."""

    def __init__(
        self,
        tmp_path: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        wrapper: list[str] | None = None,
    ):
        self.config_path = tmp_path / "connwatch.yaml"
        self.write_config(config)
        self.env = {**os.environ, **(env or {})}
        self.wrapper = wrapper or []  # e.g. prlimit: it execs the daemon, so the PID stays its
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self.stderr = b""
        self._new_line = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self.admin_port = 0
        self.ports: dict[str, int] = {}

    def write_config(self, config: dict[str, Any]) -> None:
        config = with_variant(config)  # CW_TEST_VARIANT, where the test left the key unset
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    async def start(self, *args: str) -> DaemonProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *self.wrapper,
            sys.executable,
            "-m",
            "connwatch",
            "run",
            "-c",
            str(self.config_path),
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())
        started = await self.wait_for("daemon_started", timeout=15)
        self.admin_port = int(started["admin_port"])
        for line in self.lines:
            if line.get("event") == "listener_started" and line.get("port"):
                self.ports[line["listener"]] = int(line["port"])
        return self

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            try:
                record = json.loads(raw)
            except ValueError:
                record = {"event": "_unparsed", "text": raw.decode(errors="replace")}
            async with self._new_line:
                self.lines.append(record)
                self._new_line.notify_all()
        async with self._new_line:
            self._new_line.notify_all()

    def find(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [
            line
            for line in self.lines
            if line.get("event") == event and all(line.get(k) == v for k, v in match.items())
        ]

    async def wait_for(
        self, event: str, timeout: float = 10, count: int = 1, **match: Any
    ) -> dict[str, Any]:
        """Wait until `count` log lines with this event (and fields) have appeared."""
        async with asyncio.timeout(timeout), self._new_line:
            while len(found := self.find(event, **match)) < count:
                if self._reader is not None and self._reader.done():
                    raise AssertionError(f"daemon exited before {event!r}: {await self._stderr()}")
                await self._new_line.wait()
            return found[count - 1]

    async def _stderr(self) -> str:
        assert self.proc is not None
        assert self.proc.stderr is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                self.stderr += await self.proc.stderr.read()
        return self.stderr.decode(errors="replace")

    def port(self, listener: str) -> int:
        return self.ports[listener]

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await self.wait_exit(30)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()

    async def __aenter__(self) -> DaemonProcess:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- admin ------------------------------------------------------------------------------------
    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        return await http_request("GET", self.admin_port, path, headers)

    async def metrics(self) -> dict[str, float]:
        status, body = await self.get("/metrics")
        assert status == 200
        return parse_metrics(body.decode())

    async def connections(self, query: str = "") -> list[dict[str, Any]]:
        status, body = await self.get("/connections" + query)
        assert status == 200, body
        result: list[dict[str, Any]] = json.loads(body)
        return result


async def http_request(
    method: str, port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """A blocking urllib request run in a thread (the admin endpoint is plain HTTP/1.1)."""

    def call() -> tuple[int, bytes]:
        req = urllib.request.Request(
            f"http://{LOOPBACK}:{port}{path}", method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read()

    return await asyncio.to_thread(call)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Exposition text as {'name{labels}': value}, labels as written by prometheus_client."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def eventually(check: Callable[[], Any], timeout: float = 10, interval: float = 0.02) -> Any:
    """Poll `check` until it returns a truthy value (for state only visible by polling)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: last value {result!r}")
        await asyncio.sleep(interval)


# -- the probe command ----------------------------------------------------------------------------
async def run_probe(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`python -m connwatch probe ARGV` in a subprocess: exit code, stdout and stderr.

    Awaited, not blocking, so that the servers a test runs on this loop keep answering the probe.
    """
    args = [sys.executable, "-m", "connwatch", "probe", *argv]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())
